"""Common GPUs: memory, memory bandwidth, dense tensor-core peaks and rental prices.

Specifications are NVIDIA's data sheets (dense, without sparsity; the A10G row is the A10's
sheet, AWS publishes no separate figures). Prices are US dollars per GPU-hour, approximate, as
2026 pricing surveys reported them (see docs/plan.md for the sources and date): on-demand at a
hyperscaler (AWS where it rents the GPU; the RTX 4090 at community clouds) and a typical spot
(interruptible) price. They change often: ``--price-per-hour`` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    bandwidth_gb_per_s: float
    bf16_tflops: float
    #: None where the GPU has no FP8 tensor cores (Ampere).
    fp8_tflops: float | None
    price_per_hour: float
    spot_price_per_hour: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GB)


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("A10G", 24, 600, 125, None, 1.01, 0.45),
        GPU("L4", 24, 300, 121, 242, 0.80, 0.35),
        GPU("L40S", 48, 864, 362, 733, 1.86, 0.80),
        GPU("RTX-4090", 24, 1008, 165, 330, 0.69, 0.35),
        GPU("A100-40GB", 40, 1555, 312, None, 2.75, 1.10),
        GPU("A100-80GB", 80, 2039, 312, None, 3.40, 1.30),
        GPU("H100", 80, 3350, 989, 1979, 3.90, 2.25),
        GPU("H200", 141, 4800, 989, 1979, 5.50, 3.00),
    )
}


def find_gpu(name: str) -> GPU:
    """A GPU of the table by name, ignoring case, spaces, dashes and a trailing 'GB'."""

    def norm(text: str) -> str:
        return text.lower().replace(" ", "").replace("-", "").replace("_", "")

    wanted = norm(name)
    for gpu in GPUS.values():
        if norm(gpu.name) in (wanted, wanted + "gb"):
            return gpu
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give --gpu-memory and --bandwidth)")
