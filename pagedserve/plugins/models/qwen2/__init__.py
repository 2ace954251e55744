"""The Qwen2 / Qwen2.5 architecture: Llama with biases on q, k and v."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("Qwen2ForCausalLM", "pagedserve.plugins.models.qwen2.model:Qwen2ForCausalLM")
