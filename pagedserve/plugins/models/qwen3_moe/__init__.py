"""The Qwen3-MoE architecture: Qwen3 with a sparse mixture-of-experts MLP."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("Qwen3MoeForCausalLM", "pagedserve.plugins.models.qwen3_moe.model:Qwen3MoeForCausalLM")
