"""Built-in plugin: int8 weight-only quantization at load time (``quantization="int8"``).
Registrations only."""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_quantization_methods(register: Register) -> None:
    register("int8", "pagedserve.plugins.quant.int8:Int8Config")
