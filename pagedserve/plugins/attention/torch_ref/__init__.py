"""The plain-PyTorch paged attention backend: the CPU default and every kernel's reference."""

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_attention_backends(register: Register) -> None:
    register("torch_ref", "pagedserve.plugins.attention.torch_ref.backend:TorchRefBackend", priority=0)
