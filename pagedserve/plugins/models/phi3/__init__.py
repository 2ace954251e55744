"""The Phi-3 / Phi-3.5 / Phi-4-mini architecture: fused qkv and gate_up weights, LongRoPE."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("Phi3ForCausalLM", "pagedserve.plugins.models.phi3.model:Phi3ForCausalLM")
