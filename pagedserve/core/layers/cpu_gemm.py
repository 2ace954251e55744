"""Dense matmuls on the CPU through oneDNN, on weights reordered once after loading.

``F.linear`` on a CPU tensor calls MKL's sgemm in float32, which at the few rows of a decode or
verification step runs far below the memory bandwidth: on a 2-core AMD EPYC (AVX-512, no AMX),
a 384 x 4,096 head took 144 µs at 1 row and 316 µs at 5 (2 threads), against 67 and 94 µs for
oneDNN's inner product on the same weight reordered into its blocked layout, and it stayed faster
packed up to a 512-token prefill, in float32 and bfloat16 alike; on a small weight hot in the
cache MKL can win, though not in a model's step, where the other layers' weights have evicted it
(``time_both``; docs/benchmarks.md, "oneDNN prepacked weights"). The reorder is the one inductor's ``freezing`` applies
(``mkldnn._reorder_linear_weight``), and the matmul the op it emits
(``mkldnn._linear_pointwise``): no code of ours computes.

The compiled CPU decode step (``-O3``) calls it too, as the opaque op ``pagedserve::packed_linear``
(an mkldnn tensor cannot be traced into inductor's graph, but it can be a custom op's argument),
so its small decode matmuls and the LM head read the packed weights, and so do the prefill steps it
runs eagerly; without it they were plain bf16 matmuls that re-lay their weight out every call
(measured on the bundled-scale Mixtral's compiled one-sequence step: the head 313 µs against
158 packed). Two engines keep the dense weights: ``torch_compile`` (its dynamic shapes would specialize on the
row threshold) and ``-O3`` with inductor's own ``freezing`` (``inductor_compile_config``), which
packs them itself. A packed linear layer drops its dense weight (one copy in memory); a tied LM
head keeps it, since the embedding reads it, and holds the packed copy beside.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig

#: The row count oneDNN chooses the packed layout for. Measured on the layers of the bundled
#: model (1-512 rows, float32 and bfloat16), 16, 64 and 256 gave the same times within noise;
#: packing for 1 row made 2-16 rows up to twice as slow.
EXPECTED_ROWS = 64

PACKED_DTYPES = (torch.float32, torch.bfloat16)

#: Row counts up to this run unpadded (``bucketed_rows``): a decode step's counts, at most one
#: per batch size, which recur step after step.
EXACT_ROWS = 64

#: The row counts each weight shape is timed at (the decode and verification sizes where the
#: two libraries differ most; from 16 rows on oneDNN was faster for every shape measured).
CALIBRATION_ROWS = (1, 2, 4, 8, 16)


def onednn_available() -> bool:
    """Whether this torch build has oneDNN and the two ops (they are private to inductor)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def packs_dense_weights(config: EngineConfig, device: torch.device) -> bool:
    """Whether an engine's dense weights may be packed: on the CPU, eager or ``-O3`` without
    inductor's ``freezing`` (see the module's docstring)."""
    freezing = config.compilation_level == 3 and bool(config.inductor_compile_config.get("freezing"))
    return device.type == "cpu" and not config.torch_compile and not freezing


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] reordered into oneDNN's blocked layout (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), EXPECTED_ROWS)


def bucketed_rows(rows: int) -> int:
    """The row count a packed matmul of ``rows`` rows runs at: ``rows`` itself up to
    ``EXACT_ROWS``, above it rounded up to one of 8 sizes an octave (at most 1/8 more rows)."""
    if rows <= EXACT_ROWS:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on ``pack(weight)``, its rows zero-padded to
    ``bucketed_rows``: oneDNN builds (JIT-compiles) a kernel for every new row count it sees, 8 ms
    for a bfloat16 one of 723 rows against 0.5 ms to run it (docs/benchmarks.md), and a prefill's
    rows (a chunk's tokens, an expert's share of them) are a new count nearly every step."""
    rows = x.numel() // x.shape[-1]
    padded = bucketed_rows(rows)
    if padded == rows:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, padded - rows))
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")[:rows]
    return out.view(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: nn.Module) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``layer``'s packed weight when it has one and ``x``
    has at least its ``onednn_min_rows`` rows (``no_packed_weight`` set both at creation)."""
    packed = layer.onednn_weight
    if packed is not None and x.numel() >= layer.onednn_min_rows * x.shape[-1]:
        return packed_matmul(x, packed, bias)
    return F.linear(x, weight, bias)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``packed_linear``, as the opaque op ``pagedserve::packed_linear`` under ``torch.compile``."""
    if torch.compiler.is_compiling():
        return torch.ops.pagedserve.packed_linear.default(x, packed, bias)
    return packed_linear(x, packed, bias)


# Registered with ``torch.library.Library`` rather than ``torch.library.custom_op`` (as the other
# ops of ours are): a compiled step calls it for every matmul, and custom_op's Python wrapper cost
# 3.2 µs more a call (16 packed 64 x 64 matmuls in a compiled graph: 392 against 444 µs).
_library = torch.library.Library("pagedserve", "FRAGMENT")
_library.define("packed_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor")
_library.impl("packed_linear", packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("pagedserve::packed_linear")
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def no_packed_weight(layer: nn.Module) -> None:
    """The layer's dense weight is the one its matmul reads (until ``prepack_dense_linears``)."""
    layer.onednn_weight, layer.onednn_min_rows = None, 1


def _best_time(fn: Callable[[], object], budget: float = 0.02, repeats: int = 5) -> float:
    """The best of ``repeats`` timings of ``fn`` a call, over as many calls each (up to 10) as
    fit in about ``budget`` seconds in all: a large head costs milliseconds a call."""
    start = time.perf_counter()
    fn()  # warm-up, and the estimate of one call
    calls = max(1, min(10, int(budget / repeats / max(time.perf_counter() - start, 1e-7))))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


#: The bytes of weight copies each shape is timed on in turn (``time_both``): more than any
#: core's L2 (1-2 MiB on current x86 server cores), as in a model's step, where the other layers'
#: weights evict a layer's own between two of its calls. Timed on one copy, hot in L2, MKL won
#: at 1 row on the bundled model's 384 x 384 and 640 x 384 float32 weights (12 against 20 µs);
#: taking turns over 16 MiB of copies oneDNN won every shape at every row count (26 against 60).
ROTATION_BYTES = 16 << 20


def rotation(weight: torch.Tensor, packed: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``ROTATION_BYTES`` of copies of ``weight`` and the same number of ``packed`` (each list
    starting with the original), for ``time_both`` to take turns over."""
    copies = max(1, ROTATION_BYTES // (weight.numel() * weight.element_size()))
    dense = [weight] + [weight.clone() for _ in range(copies - 1)]
    return dense, [packed] + [pack(w) for w in dense[1:]]


def time_both(dense: list[torch.Tensor], onednn: list[torch.Tensor], rows: int) -> tuple[float, float]:
    """The best times a call of ``F.linear`` and ``packed_linear`` on ``rows`` rows, each call on
    the next of the copies ``dense`` (and ``onednn``) of one weight (``rotation``)."""
    x = torch.randn(rows, dense[0].shape[1], dtype=dense[0].dtype)
    turn = itertools.count()
    return (_best_time(lambda: F.linear(x, dense[next(turn) % len(dense)])),
            _best_time(lambda: packed_linear(x, onednn[next(turn) % len(onednn)], None)))


Timer = Callable[[list[torch.Tensor], list[torch.Tensor], int], tuple[float, float]]


def packed_from_rows(weight: torch.Tensor, packed: torch.Tensor, timer: Timer | None = None) -> int | None:
    """The fewest rows from which the packed matmul is faster, of ``CALIBRATION_ROWS``, timed on
    this machine from the most rows down (None: not even at the most). oneDNN pays a fixed cost
    a call (about 15 µs measured) that MKL does not, while MKL's few-row sgemm runs far below the
    bandwidth: which wins depends on the shape, the CPU and its caches."""
    copies = rotation(weight, packed)  # built once for every row count
    first = None
    for rows in reversed(CALIBRATION_ROWS):
        dense, onednn = (timer or time_both)(*copies, rows)
        if onednn >= dense:
            break
        first = rows
    return first


def prepack_dense_linears(model: nn.Module) -> int:
    """Pack the weight of every dense (unquantized) float32 or bfloat16 linear layer and LM head
    of a CPU model (``onednn_weight``) whose shape runs faster packed at some of
    ``CALIBRATION_ROWS`` on this machine, timed with the torch threads the caller runs the model
    with. A layer packed from its first row drops its dense weight, unless it is a tied head
    (the embedding reads it); the others keep both and call oneDNN from ``onednn_min_rows``.
    Returns how many were packed (0 where oneDNN is missing)."""
    from pagedserve.core.layers.embedding import LMHead
    from pagedserve.core.layers.linear import Linear
    from pagedserve.core.layers.quantization import UnquantizedLinearMethod

    if not onednn_available():
        return 0
    decided: dict[tuple[int, int, torch.dtype], int | None] = {}
    count = 0
    with torch.inference_mode():
        for module in model.modules():
            if isinstance(module, Linear) and type(module.quant_method) is UnquantizedLinearMethod:
                keep_dense = False
            elif isinstance(module, LMHead) and module.quant_method is None:
                keep_dense = module.tied
            else:
                continue
            weight = module.weight
            if weight.device.type != "cpu" or weight.dtype not in PACKED_DTYPES or weight.dim() != 2:
                continue
            packed = pack(weight)
            key = (*weight.shape, weight.dtype)
            if key not in decided:
                decided[key] = packed_from_rows(weight, packed)
            min_rows = decided[key]
            if min_rows is None:
                continue
            module.onednn_weight, module.onednn_min_rows = packed, min_rows
            if min_rows == 1 and not keep_dense:
                module.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype), requires_grad=False)
            count += 1
    return count
