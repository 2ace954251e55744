"""The Qwen3 architecture: Llama with an RMSNorm over each head of q and k."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("Qwen3ForCausalLM", "pagedserve.plugins.models.qwen3.model:Qwen3ForCausalLM")
