"""The Mixtral architecture: Mistral with a sparse mixture-of-experts MLP."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("MixtralForCausalLM", "pagedserve.plugins.models.mixtral.model:MixtralForCausalLM")
