"""The CPU decode step compiled by inductor (``compilation_config`` level 3, ``-O3``).

On a small CPU a decode step at a small batch is mostly per-op overhead: a few dozen small
matmuls, norms, rope and activations, each dispatched on its own (issue 22's profile: 30-47% of a
batch-1 step outside any op). Here each padded decode size of ``PaddedDecode`` (the persistent
input buffers of ``core/cuda_graphs.py``) gets its own static-shape graph: ``torch.compile`` with
``dynamic=False``, so inductor fuses the elementwise work into a few C++ kernels around the
matmuls and dynamo's guards check a fixed shape.

Attention: a backend with ``supports_traced_decode`` (the CPU default, ``torch_ref``) is traced
into the graph (``TracedDecode``): the step's block tables, sequence lengths and slot mapping
are graph inputs, the block-table axis of one symbolic width (``mark_dynamic``: one graph per
padded size serves every context length), and inductor turns the paged reads into C++ loops
that index the cache in place. The step then builds no host metadata and calls no opaque op:
measured on tiny-py at batch 1, the opaque op and its metadata were 40% of a compiled step. Any
other backend stays the opaque ``pagedserve::attention`` op (its per-step metadata is host
state), so every attention backend keeps working under it.

The graphs are compiled at start-up, largest first, and kept by inductor's own on-disk caches
(the FX graph and AOT autograd caches, on by default), so a second start with the same model,
dtype and sizes compiles much faster than the first. Compiling is slow on a small CPU (tens of
seconds a size on two cores, measured in docs/benchmarks.md), which is why it is opt-in and the
CPU default sizes are few.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagedserve.core.config import ConfigError
from pagedserve.core.forward_context import traced_decode_step

if TYPE_CHECKING:
    from pagedserve.core.cuda_graphs import Forward
    from pagedserve.core.layers.attention import AttentionBackend

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


class TracedDecode(nn.Module):
    """The model's forward with the decode step's attention inputs as arguments, published to
    the attention layers (``forward_context.traced_decode_step``) while dynamo traces it."""

    def __init__(self, model: nn.Module, backend: AttentionBackend) -> None:
        super().__init__()
        self.model = model
        self.backend = backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        step = traced_decode_step
        step.backend, step.block_tables, step.seq_lens, step.slot_mapping = (
            self.backend, block_tables, seq_lens, slot_mapping)
        hidden = self.model(input_ids, positions)
        step.backend = step.block_tables = step.seq_lens = step.slot_mapping = None
        return hidden


def compile_decode(model: nn.Module, num_sizes: int, backend: AttentionBackend,
                   options: dict[str, Any] | None = None) -> Forward:
    """The model forward compiled for static shapes: dynamo traces it once per padded size (the
    recompile limit raised by ``num_sizes``: every compiled engine's graphs, the draft's among
    them, hang on the one forward code object, so each adds its own) and inductor compiles each
    trace, with
    ``options`` (``compilation_config["inductor_compile_config"]``). With a backend that traces
    its decode attention, the forward is ``TracedDecode``'s (five arguments)."""
    torch._dynamo.config.recompile_limit += num_sizes
    traced = TracedDecode(model, backend) if type(backend).supports_traced_decode else model
    try:
        return torch.compile(traced, dynamic=False, fullgraph=True, options=options or None)
    except RuntimeError as exc:  # inductor refusing an option, by name (then it lists all of them) or type
        reason = str(exc).split(", known options are")[0]
        raise ConfigError(f"compilation_config inductor_compile_config: {reason}") from None

