"""Built-in plugin: FP8 weights (vLLM's ``fp8`` format, compressed-tensors FP8 checkpoints from
llm-compressor, and ``quantization="fp8"`` on unquantized checkpoints). Registrations only."""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl


@hookimpl
def register_quantization_methods(register: Register) -> None:
    register("fp8", "pagedserve.plugins.quant.fp8:Fp8Config")
    register("compressed-tensors", "pagedserve.plugins.quant.compressed_tensors:CompressedTensorsConfig")
