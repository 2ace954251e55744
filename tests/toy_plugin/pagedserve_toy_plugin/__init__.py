"""A third-party plugin: a new architecture name and a new attention backend."""

from pagedserve import hookimpl


@hookimpl
def register_models(register):
    register("ToyLlamaForCausalLM", "pagedserve_toy_plugin.model:ToyLlamaForCausalLM")


@hookimpl
def register_attention_backends(register):
    # Higher priority than torch_ref, so the engine picks it without being told.
    register("toy", "pagedserve_toy_plugin.attention:ToyBackend", priority=10)
