"""The CPU decode step compiled by inductor (``compilation_config`` level 3, ``-O3``).

On a small CPU a decode step at a small batch is mostly per-op overhead: a few dozen small
matmuls, norms, rope and activations, each dispatched on its own (issue 22's profile: 30-47% of a
batch-1 step outside any op). Here each padded decode size of ``PaddedDecode`` (the persistent
input buffers of ``core/cuda_graphs.py``) gets its own static-shape graph: ``torch.compile`` with
``dynamic=False``, so inductor fuses the elementwise work into a few C++ kernels around the
matmuls and dynamo's guards check a fixed shape. Attention stays the opaque
``pagedserve::attention`` op (the backend's per-step metadata is host state), so every attention
backend keeps working under it.

The graphs are compiled at start-up, largest first, and kept by inductor's own on-disk caches
(the FX graph and AOT autograd caches, on by default), so a second start with the same model,
dtype and sizes compiles much faster than the first. Compiling is slow on a small CPU (tens of
seconds a size on two cores, measured in docs/benchmarks.md), which is why it is opt-in and the
CPU default sizes are few.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from pagedserve.core.cuda_graphs import Forward

#: The padded sizes compiled when ``cuda_graph_sizes`` is not given: a graph per power of two
#: (padding costs at most half a batch), few enough to compile at start-up.
DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64)


def default_compile_sizes(max_num_seqs: int) -> list[int]:
    """The powers of two of ``DEFAULT_SIZES`` below ``max_num_seqs``, and ``max_num_seqs`` itself
    when it is at most the largest of them (larger batches run eagerly)."""
    sizes = [size for size in DEFAULT_SIZES if size < max_num_seqs]
    if max_num_seqs <= DEFAULT_SIZES[-1]:
        sizes.append(max_num_seqs)
    return sizes


def compile_decode(model: nn.Module, num_sizes: int) -> Forward:
    """The model forward compiled for static shapes: dynamo traces it once per padded size (the
    recompile limit raised to allow every size) and inductor compiles each trace."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, num_sizes + 1)
    return torch.compile(model, dynamic=False, fullgraph=True)

