from pagedserve.plugins.models.llama.model import LlamaForCausalLM


class ToyLlamaForCausalLM(LlamaForCausalLM):
    """Llama's weights under a new architecture name."""

    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).built += 1
