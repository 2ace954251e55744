"""Padded decode steps from persistent input buffers, captured as CUDA graphs (as vLLM does).

A decode-only step (every scheduled request brings one token) is padded to the next size of
``cuda_graph_sizes``. Its inputs (token ids, positions, slot mapping, block tables, sequence
lengths, query start offsets) are written into buffers allocated once, so every step of one
padded size runs the forward on the same tensors. On CUDA the forward of each size is captured
once at start-up and replayed: one launch for the whole model instead of hundreds, which at small
batches is most of a decode step's time. Steps that are not decode-only (a prefill chunk,
speculative verification, embeddings, LoRA) and batches above the largest size run eagerly.

Padding rows are requests of one token whose key and value go to a block no request owns (the
runner allocates one block beyond the scheduler's ``num_kv_blocks``), so they cannot touch a real
request's cache; their outputs are dropped.

The same padded path runs on the CPU without capture (``cuda_graph_sizes`` given on the CPU), so
the tests show it gives transformers' tokens exactly and only the capture itself needs a GPU. With
``compilation_config`` level 3 on the CPU, each size's forward is instead a static-shape inductor
graph (``core/compiled_decode.py``), compiled by ``compile_all``; without ``cuda_graph_sizes``
there are no padding rows at all (``exact``): each batch runs at its own size, the batch axis
symbolic in the compiled graphs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedserve.core.forward_context import BatchLayout, set_forward_context

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig
    from pagedserve.core.layers.attention import AttentionBackend

logger = logging.getLogger(__name__)


def capture_sizes(config: EngineConfig) -> list[int]:
    """The padded batch sizes, ascending: ``cuda_graph_sizes`` as vLLM reads it (one value N:
    1, 2, 4, the multiples of 8 up to N, and N; several values: those sizes), by default up to
    ``max_num_seqs``. None exceeds ``max_num_seqs``."""
    max_num_seqs = config.scheduler.max_num_seqs
    given = config.cuda_graph_sizes or [max_num_seqs]
    if len(given) == 1:
        limit = min(given[0], max_num_seqs)
        given = [size for size in (1, 2, 4, *range(8, limit + 1, 8)) if size < limit] + [limit]
    return sorted({size for size in given if size <= max_num_seqs})


def cuda_graph_reason(config: EngineConfig, device: torch.device, backend: AttentionBackend) -> str | None:
    """Why decode steps are not captured as CUDA graphs here (None: they are)."""
    if device.type != "cuda":
        return f"the device is {device.type!r}"
    if config.enforce_eager:
        return "enforce_eager is set"
    if not type(backend).supports_cuda_graphs:
        return f"attention backend {backend.name!r} cannot be captured (it plans each step on the host)"
    if config.lora.enable_lora:
        return "enable_lora is set (the adapter slots change between steps)"
    if config.parallel.tensor_parallel_size > 1:
        return "tensor_parallel_size > 1 (the ranks' collectives are not captured yet)"
    return None


class DecodeBuffers:
    """The persistent inputs of padded decode steps, for up to ``max_size`` requests.

    ``write`` puts a step into them: numpy on the host, then one copy per buffer (from pinned
    memory on CUDA, not waiting for the device). The host staging is reused every step, which
    is safe because each step ends with the device-to-host copy of its sampled tokens.
    """

    def __init__(self, max_size: int, max_blocks_per_seq: int, block_size: int, pad_block: int,
                 device: torch.device) -> None:
        self.max_size = max_size
        self.block_size = block_size
        self.pad_block = pad_block
        self.device = device
        pin = device.type == "cuda"

        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host staging, device buffer)

        def pair(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
            host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
            buffer = torch.zeros(shape, dtype=dtype, device=device)
            self._copies.append((host, buffer))
            return buffer, host.numpy()

        self.input_ids, self._input_ids = pair(max_size, dtype=torch.int64)
        self.positions, self._positions = pair(max_size, dtype=torch.int64)
        self.slot_mapping, self._slot_mapping = pair(max_size, dtype=torch.int64)
        self.seq_lens, self._seq_lens = pair(max_size, dtype=torch.int32)
        self.block_tables, self._block_tables = pair(max_size, max_blocks_per_seq, dtype=torch.int32)
        # One new token per request: request i's query is token i, always.
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int32, device=device)
        self.write([], [], [], max_size)  # every row a padding row until a step writes it

    def write(self, token_ids: list[int], positions: list[int], block_ids: list[list[int]], size: int) -> list[int]:
        """Write one decode step: request i decodes ``token_ids[i]`` at ``positions[i]`` with
        its blocks ``block_ids[i]``; rows ``len(token_ids)..size - 1`` become padding rows (one
        token at position 0 in the padding block). Returns the ``size`` sequence lengths."""
        n = len(token_ids)
        self._input_ids[:n] = token_ids
        self._input_ids[n:size] = 0
        pos = self._positions
        pos[:n] = positions
        pos[n:size] = 0
        tables = self._block_tables
        tables[:size] = 0
        for row, (blocks, position) in enumerate(zip(block_ids, positions)):
            needed = position // self.block_size + 1  # blocks past it (lookahead) are not read
            tables[row, :needed] = blocks[:needed]
        tables[n:size, 0] = self.pad_block
        rows = np.arange(size)
        block = tables[rows, pos[:size] // self.block_size]
        self._slot_mapping[:size] = block.astype(np.int64) * self.block_size + pos[:size] % self.block_size
        self._seq_lens[:size] = pos[:size] + 1
        for host, buffer in self._copies:
            buffer[:size].copy_(host[:size], non_blocking=True)
        return self._seq_lens[:size].tolist()

    def layout(self, size: int, seq_lens: list[int], max_seq_len: int) -> BatchLayout:
        """The first ``size`` rows as a step's layout. ``max_seq_len`` is what the attention
        backend plans with: for a captured graph, an upper bound (``max_model_len``)."""
        return BatchLayout(
            num_reqs=size,
            num_tokens=size,
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            num_computed_tokens=self.seq_lens[:size] - 1,
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            positions=self.positions[:size],
            max_query_len=1,
            max_seq_len=max_seq_len,
            block_size=self.block_size,
            query_lens_list=[1] * size,
            seq_lens_list=seq_lens,
            first_blocks_if_consecutive=self._first_blocks(size) if self.device.type == "cpu" else None,
        )

    def _first_blocks(self, size: int) -> list[int | None]:
        """``BatchLayout.first_blocks_if_consecutive`` of the rows last written (on the host):
        an eager padded step on the CPU then reads a lone request's context as a slice."""
        tables = self._block_tables[:size]
        needed = self._positions[:size] // self.block_size + 1
        filled = np.arange(1, tables.shape[1])[None, :] < needed[:, None]
        consecutive = np.all((np.diff(tables, axis=1) == 1) | ~filled, axis=1)
        return [int(b) if c else None for b, c in zip(tables[:, 0], consecutive)]


#: ``forward(input_ids, positions)``, or for a traced compiled step ``forward(input_ids,
#: positions, block_tables, seq_lens, slot_mapping)`` (``core/compiled_decode.py``).
Forward = Callable[..., torch.Tensor]


class PaddedDecode:
    """Decode-only steps padded to the next of ``sizes``; with ``capture``, each size's forward
    is a CUDA graph captured by ``capture_all`` and replayed by ``run``; ``forward`` may be a
    forward compiled for static shapes, each size compiled by ``compile_all``, and ``traced``
    when its attention is traced into the graph (it then takes the step's attention tensors
    and no metadata is built).

    ``exact`` (a traced compiled forward): no padding; a batch of up to ``sizes[-1]`` requests
    runs at its own size, the batch axis of its inputs symbolic (``maybe_mark_dynamic``), so one
    graph serves every batch from 2 up (dynamo specialises a size of 1, and a model that
    branches on the batch size, as the MoE layer's dense decode experts do, splits the range
    into a graph per branch). Padding a step of 33 requests to 64 cost every padding row a full
    row's attention and experts: on the 64-request offline workload, two ``-O3`` engines taking
    turns, exact sizes ran the bundled-scale Mixtral 1.07x and the bundled model 1.04x faster
    (bf16, medians of 8 and 6 rounds: docs/benchmarks.md)."""

    def __init__(self, config: EngineConfig, sizes: list[int], backend: AttentionBackend, forward: Forward,
                 pad_block: int, device: torch.device, capture: bool, traced: bool = False,
                 exact: bool = False) -> None:
        if exact and not traced:
            raise ValueError("exact decode sizes need a compiled forward that traces its attention")
        self.sizes = sizes
        self.backend = backend
        self.forward = forward
        self.capture = capture
        self.traced = traced
        self.exact = exact
        self.max_model_len = int(config.model.max_model_len)  # type: ignore[arg-type]
        block_size = config.cache.block_size
        # At least two block columns: a traced step's block-table axis is never specialised to 1.
        max_blocks = max(2, -(-self.max_model_len // block_size))
        self.buffers = DecodeBuffers(sizes[-1], max_blocks, block_size, pad_block, device)
        #: size -> (graph, its static metadata, its output) once captured.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Any, torch.Tensor]] = {}
        self.pool_bytes = 0

    def padded_size(self, num_reqs: int) -> int | None:
        """The size a batch of ``num_reqs`` decodes at (None: larger than every size)."""
        if self.exact:
            return num_reqs if num_reqs <= self.sizes[-1] else None
        for size in self.sizes:
            if size >= num_reqs:
                return size
        return None

    def run(self, token_ids: list[int], positions: list[int], block_ids: list[list[int]], size: int) -> torch.Tensor:
        """The hidden states [len(token_ids), hidden] of one decode step padded to ``size``."""
        seq_lens = self.buffers.write(token_ids, positions, block_ids, size)
        n = len(token_ids)
        graph = self.graphs.get(size)
        if graph is not None:
            graph[0].replay()
            return graph[2][:n]
        return self._forward(size, seq_lens)[:n]

    def _forward(self, size: int, seq_lens: list[int]) -> torch.Tensor:
        buffers = self.buffers
        ids, positions = buffers.input_ids[:size], buffers.positions[:size]
        if self.traced:
            # The blocks that hold the longest context (at least 2: a width of 1 would be
            # specialised by dynamo, a second graph), the axis symbolic in the one graph.
            width = max(2, -(-max(seq_lens) // buffers.block_size))
            tables = buffers.block_tables[:size, :width]
            torch._dynamo.mark_dynamic(tables, 1)
            inputs = (ids, positions, tables, buffers.seq_lens[:size], buffers.slot_mapping[:size])
            if self.exact and size > 1:
                for tensor in inputs:
                    torch._dynamo.maybe_mark_dynamic(tensor, 0)
            return self.forward(*inputs)
        layout = buffers.layout(size, seq_lens, max(seq_lens))
        with set_forward_context(self.backend, self.backend.build_metadata(layout)):
            return self.forward(ids, positions)

    def compile_all(self) -> None:
        """Run every size once, the largest first, so that the compiled forward traces and
        compiles each size's graph at start-up instead of in a request's step (``exact``: every
        batch size up to the largest, so that any range a guard splits off is compiled too)."""
        start = time.perf_counter()
        sizes = range(self.sizes[-1], 0, -1) if self.exact else reversed(self.sizes)
        for size in sizes:
            self._forward(size, self.buffers.write([], [], [], size))
        logger.info(
            "compiled the decode step for %s in %.1f s",
            f"batch sizes 1-{self.sizes[-1]} (exact)" if self.exact
            else f"{len(self.sizes)} batch sizes ({', '.join(map(str, self.sizes))})", time.perf_counter() - start,
        )

    def capture_all(self) -> None:
        """Capture every size, the largest first, all in one memory pool (a smaller graph reuses
        the larger one's activations, as vLLM does). Each size runs once eagerly first, so that
        kernels compile (and any autotuning runs) outside the capture."""
        start = time.perf_counter()
        device = self.buffers.device
        free_before = torch.cuda.mem_get_info(device)[0]
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            seq_lens = self.buffers.write([], [], [], size)
            layout = self.buffers.layout(size, seq_lens, self.max_model_len)
            metadata = self.backend.build_metadata(layout)
            ids, positions = self.buffers.input_ids[:size], self.buffers.positions[:size]
            with set_forward_context(self.backend, metadata):
                self.forward(ids, positions)
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self.forward(ids, positions)
            self.graphs[size] = (graph, metadata, out)
        torch.cuda.synchronize(device)
        self.pool_bytes = max(free_before - torch.cuda.mem_get_info(device)[0], 0)
        logger.info(
            "captured CUDA graphs of the decode step for %d batch sizes (%d..%d) in %.1f s, %.0f MiB",
            len(self.sizes), self.sizes[0], self.sizes[-1], time.perf_counter() - start, self.pool_bytes / 2**20,
        )
