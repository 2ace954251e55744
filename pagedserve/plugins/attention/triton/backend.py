"""The Triton paged attention backend: KV store, unified varlen attention, split-KV decoding.

This module imports torch only; the kernels (and triton) are imported when a backend is built,
so the engine can ask ``supports`` on a machine without triton and get a reason, not a crash.

Selection rule: the backend registers with a priority above torch_ref's, so on CUDA it is the
default. On any other device ``supports`` refuses unless ``TRITON_INTERPRET=1`` is set *and* the
configuration names it (``attention_backend="triton"``): the interpreter is a test tool (orders of
magnitude slower than torch_ref), so automatic selection never picks it and the CPU keeps
torch_ref.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagedserve.core.forward_context import BatchLayout
from pagedserve.core.layers.attention import Attention, AttentionBackend

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig

#: The largest head size a program holds in registers (query rows and accumulator).
MAX_HEAD_SIZE = 256


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (its own ``TRITON_INTERPRET`` switch)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _head_size(config: EngineConfig) -> int | None:
    hf = getattr(config.model, "hf_config", None)
    if hf is None:
        return None
    head_dim = getattr(hf, "head_dim", None)
    return int(head_dim) if head_dim else int(hf.hidden_size) // int(hf.num_attention_heads)


def unsupported_reason(config: EngineConfig | None) -> str | None:
    """Why the Triton backend cannot serve ``config`` here (``None``: it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'pagedserve[triton]')"
    if config is None:
        return None
    device = torch.device(config.device.resolved())
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0):
            return f"needs a GPU of compute capability >= 8.0, this one is {capability[0]}.{capability[1]}"
        if config.cache.kv_cache_dtype == "fp8" and capability < (8, 9):
            return "kv_cache_dtype='fp8' needs compute capability >= 8.9 (Ada, Hopper or newer)"
    elif not interpreting():
        return (
            f"Triton kernels need a CUDA GPU (device is {device.type!r}); on the CPU they run only "
            "interpreted, for tests: set TRITON_INTERPRET=1"
        )
    elif config.attention_backend != "triton":
        return "the Triton interpreter is never picked automatically; ask for attention_backend='triton'"
    head_size = _head_size(config)
    if head_size is not None and head_size > MAX_HEAD_SIZE:
        return f"head size {head_size} exceeds {MAX_HEAD_SIZE}"
    return None


@dataclass
class TritonMetadata:
    """One step's batch, plus what layers of the same shape share (built lazily, once)."""

    layout: BatchLayout
    #: (num_heads, head_size, num_splits) -> float32 partial buffers of the split-KV path.
    partials: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )

    def split_buffers(
        self, num_heads: int, head_size: int, num_splits: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Partial buffers for this step, reused by every layer (layers run one after another)."""
        key = (num_heads, head_size, num_splits)
        buffers = self.partials.get(key)
        if buffers is None:
            device = self.layout.query_start_loc.device
            rows = (self.layout.num_tokens, num_heads, num_splits)
            buffers = (
                torch.empty((*rows, head_size), dtype=torch.float32, device=device),
                torch.empty(rows, dtype=torch.float32, device=device),
                torch.empty(rows, dtype=torch.float32, device=device),
            )
            self.partials[key] = buffers
        return buffers


class TritonBackend(AttentionBackend):
    """Paged attention with Triton kernels (the default on CUDA)."""

    name = "triton"
    supports_cuda_graphs = True

    @classmethod
    def supports(cls, config: EngineConfig | None) -> str | None:
        return unsupported_reason(config)

    def __init__(self, config: EngineConfig | None) -> None:
        super().__init__(config)
        # Imported here, not at module level: see the module docstring.
        from pagedserve.plugins.attention.triton import kv_store, paged_attention, split_kv

        self._kv_store = kv_store
        self._attention = paged_attention
        self._split_kv = split_kv
        self._num_sms: dict[torch.device, int | None] = {}

    def num_sms(self, device: torch.device) -> int | None:
        """Streaming multiprocessors of ``device`` (None off CUDA: no split-KV there)."""
        if device not in self._num_sms:
            sms = None
            if device.type == "cuda":
                sms = torch.cuda.get_device_properties(device).multi_processor_count
            self._num_sms[device] = sms
        return self._num_sms[device]

    def copy_blocks(self, kv_caches: list[torch.Tensor], pairs: torch.Tensor) -> None:
        """Copy-on-write of whole blocks; fp8 caches are copied as bytes (no fp8 indexing)."""
        src, dst = pairs[:, 0], pairs[:, 1]
        for kv in kv_caches:
            raw = kv.view(torch.uint8) if kv.element_size() == 1 else kv
            raw[:, dst] = raw[:, src]

    def build_metadata(self, layout: BatchLayout) -> TritonMetadata:
        return TritonMetadata(layout=layout)

    def num_splits(
        self, metadata: TritonMetadata, num_kv_heads: int, group: int, head_size: int, dtype: torch.dtype
    ) -> int:
        """Split-KV factor of one layer's launch (``split_kv.choose_num_splits``)."""
        layout = metadata.layout
        config = self._attention.launch_config(group, head_size, layout.max_query_len, dtype)
        programs = (layout.num_tokens // config.block_q + layout.num_reqs) * num_kv_heads
        device = layout.query_start_loc.device
        return self._split_kv.choose_num_splits(programs, layout.max_seq_len, self.num_sms(device))

    def forward(
        self,
        layer: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TritonMetadata,
    ) -> torch.Tensor:
        layout = metadata.layout
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        # Bound by the model runner next to an fp8 cache: float32 [2], the K and V scales.
        kv_scale = layer.kv_scale
        self._kv_store.store_kv(key, value, key_cache, value_cache, layout.slot_mapping, kv_scale)

        out = torch.empty_like(query)
        group = layer.num_heads // layer.num_kv_heads
        splits = self.num_splits(metadata, layer.num_kv_heads, group, layer.head_size, query.dtype)
        partials = metadata.split_buffers(layer.num_heads, layer.head_size, splits) if splits > 1 else None
        self._attention.paged_attention(
            out,
            query,
            key_cache,
            value_cache,
            layout.block_tables,
            layout.query_start_loc,
            layout.seq_lens,
            layout.max_query_len,
            layer.scale,
            layer.sliding_window,
            kv_scale,
            splits,
            partials,
            layer.logits_soft_cap,
        )
        if partials is not None:
            self._split_kv.reduce_splits(out, *partials)
        return out
