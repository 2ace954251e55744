"""Built-in plugin: the PyTorch model runner for the CPU and CUDA."""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_model_runners(register: Register) -> None:
    register("torch", "pagedserve.core.model_runner:ModelRunner", device_types=("cpu", "cuda"), priority=0)
