"""Built-in plugin: GPTQ checkpoints (AutoGPTQ / GPTQModel, classic and v2). Registrations only."""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_quantization_methods(register: Register) -> None:
    # AutoGPTQ writes its settings to quantize_config.json, often without a quant_method.
    register("gptq", "pagedserve.plugins.quant.gptq:GPTQConfig", config_files=["quantize_config.json"])
