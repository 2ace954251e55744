"""Built-in plugin: AWQ checkpoints (AutoAWQ's GEMM layout). Registrations only."""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_quantization_methods(register: Register) -> None:
    # AutoAWQ before transformers' integration wrote its settings to quant_config.json.
    register("awq", "pagedserve.plugins.quant.awq:AWQConfig", config_files=["quant_config.json"])
