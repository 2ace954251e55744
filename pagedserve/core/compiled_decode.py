"""The CPU decode step compiled by inductor (``compilation_config`` level 3, ``-O3``).

On a small CPU a decode step at a small batch is mostly per-op overhead: a few dozen small
matmuls, norms, rope and activations, each dispatched on its own (issue 22's profile: 30-47% of a
batch-1 step outside any op). Here the decode steps of ``PaddedDecode`` (the persistent input
buffers of ``core/cuda_graphs.py``) run as inductor graphs: ``torch.compile`` with
``dynamic=False``, so inductor fuses the elementwise work into a few C++ kernels around the
matmuls. By default each batch runs at its own size, its batch axis symbolic (``PaddedDecode.exact``:
a graph for one sequence, one for the rest, more where the model branches on the batch size);
with ``cuda_graph_sizes`` each of those sizes is a static graph and steps are padded to them.
The guards check the step's inputs only, not the model (``step_guard_filter``), whose graphs no
other engine can reach (``_own_forward_code``).

Attention: a backend with ``supports_traced_decode`` (the CPU default, ``torch_ref``) is traced
into the graph (``TracedDecode``): the step's block tables, sequence lengths and slot mapping
are graph inputs, the block-table axis of one symbolic width (``mark_dynamic``: one graph per
padded size serves every context length), and inductor turns the paged reads into C++ loops
that index the cache in place. The step then builds no host metadata and calls no opaque op:
measured on tiny-py at batch 1, the opaque op and its metadata were 40% of a compiled step. Any
other backend stays the opaque ``pagedserve::attention`` op (its per-step metadata is host
state), so every attention backend keeps working under it.

The graphs are compiled at start-up, largest first (every batch size is run once), and kept by
inductor's own on-disk caches (the FX graph and AOT autograd caches, on by default), so a second
start with the same model, dtype and sizes compiles much faster than the first. Compiling is slow on a small CPU (tens of
seconds a size on two cores, measured in docs/benchmarks.md), which is why it is opt-in and the
CPU default sizes are few.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagedserve.core.config import ConfigError
from pagedserve.core.cuda_graphs import PaddedDecode
from pagedserve.core.forward_context import traced_decode_step

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig
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


class DecodeStep(nn.Module):
    """The model's forward, ``forward(input_ids, positions)``, with a code object of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        _own_forward_code(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)


class TracedDecode(nn.Module):
    """The model's forward with the decode step's attention inputs as arguments, published to
    the attention layers (``forward_context.traced_decode_step``) while dynamo traces it."""

    def __init__(self, model: nn.Module, backend: AttentionBackend) -> None:
        super().__init__()
        self.model = model
        self.backend = backend
        _own_forward_code(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
        step = traced_decode_step
        step.backend, step.block_tables, step.seq_lens, step.slot_mapping = (
            self.backend, block_tables, seq_lens, slot_mapping)
        hidden = self.model(input_ids, positions)
        step.backend = step.block_tables = step.seq_lens = step.slot_mapping = None
        return hidden


_step_codes = itertools.count()


def _own_forward_code(module: nn.Module) -> None:
    """Give ``module`` a forward whose code object is its own (its class's, renamed). Dynamo keeps
    what it compiles on the code object it traced, so the graphs of this module are found only
    by this module's calls: another engine's step of the same shapes (a test's, a draft's) can
    never run them, which is what lets ``step_guard_filter`` drop the guards on the model."""
    forward = type(module).forward
    code = forward.__code__.replace(co_name=f"{forward.__name__}_{next(_step_codes)}")
    function = types.FunctionType(code, forward.__globals__, code.co_name, forward.__defaults__, forward.__closure__)
    module.forward = types.MethodType(function, module)


def step_guard_filter(entries: Sequence[Any]) -> list[bool]:
    """Which of a compiled step's guards dynamo keeps (``guard_filter_fn``): those on the step's
    inputs (each padded size is its own graph, told apart by them) and on global state, not
    those rooted in the model (``self``: its modules, weights and settings, fixed for the
    engine's life, which only this engine's calls reach: ``_own_forward_code``). Checked at every
    step, the model's guards were hundreds of tensor and attribute checks: 300-500 µs a step on
    the bundled-scale Mixtral, a fifth of a one-sequence step."""
    return [entry.name != "self" and not entry.name.startswith(("self.", "self[")) for entry in entries]


def compile_decode(model: nn.Module, num_sizes: int, backend: AttentionBackend,
                   options: dict[str, Any] | None = None) -> Forward:
    """The model forward compiled for static shapes: dynamo traces it once per padded size (the
    recompile limit, which counts the graphs of one code object, raised to ``num_sizes`` where it
    is lower) and inductor compiles each trace, with ``options``
    (``compilation_config["inductor_compile_config"]``), keeping only ``step_guard_filter``'s
    guards. The forward is this engine's own (``_own_forward_code``): ``TracedDecode``'s (five
    arguments) with a backend that traces its decode attention, else ``DecodeStep``'s."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, num_sizes)
    step = TracedDecode(model, backend) if type(backend).supports_traced_decode else DecodeStep(model)
    try:
        return torch.compile(step, dynamic=False, fullgraph=True,
                             options={**(options or {}), "guard_filter_fn": step_guard_filter})
    except RuntimeError as exc:  # inductor refusing an option, by name (then it lists all of them) or type
        reason = str(exc).split(", known options are")[0]
        raise ConfigError(f"compilation_config inductor_compile_config: {reason}") from None


def compiled_decode_steps(config: EngineConfig, model: nn.Module, backend: AttentionBackend, sizes: list[int],
                          num_blocks: int, device: torch.device, exact: bool) -> PaddedDecode:
    """The decode steps of up to ``sizes[-1]`` requests through ``compile_decode``'s forward, to
    be compiled by their ``compile_all``: each batch at its own size when ``exact`` and the
    backend traces its attention (``PaddedDecode.exact``; room for a graph per size, should a
    model specialise every batch size), else padded to ``sizes``."""
    traced = type(backend).supports_traced_decode
    exact = exact and traced
    forward = compile_decode(model, sizes[-1] if exact else len(sizes), backend, config.inductor_compile_config)
    return PaddedDecode(config, sizes, backend, forward, num_blocks, device, capture=False, traced=traced,
                        exact=exact)
