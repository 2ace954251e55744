"""The Llama architecture (Llama 2/3/3.1/3.2 and every checkpoint shaped like them)."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("LlamaForCausalLM", "pagedserve.plugins.models.llama.model:LlamaForCausalLM")
