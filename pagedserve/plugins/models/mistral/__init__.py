"""The Mistral architecture: Llama with an optional sliding attention window."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("MistralForCausalLM", "pagedserve.plugins.models.mistral.model:MistralForCausalLM")
