"""The Triton paged attention backend: the default on CUDA (see docs/attention.md).

Registration only: torch and triton are imported when the engine selects the backend.
"""

from pagedserve.core.hookspecs import Register, hookimpl

#: Above torch_ref's 0, so that the engine picks Triton wherever ``supports`` accepts it (CUDA).
PRIORITY = 20


@hookimpl
def register_attention_backends(register: Register) -> None:
    register("triton", "pagedserve.plugins.attention.triton.backend:TritonBackend", priority=PRIORITY)
