"""The Gemma 2 architecture: scaled embeddings, (1 + w) norms around attention and MLP, GeGLU, soft-capping, alternating windows."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_models(register: Register) -> None:
    register("Gemma2ForCausalLM", "pagedserve.plugins.models.gemma2.model:Gemma2ForCausalLM")
