"""What a model runner does once at start-up, before the first step: size the paged KV cache
(on an accelerator after a profile step measured the activation peak), allocate it and bind it to
the attention layers, and warm the forward up at the largest step the scheduler can make."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from pagedserve.core.forward_context import build_batch_layout, set_forward_context
from pagedserve.core.kv_sizing import allocator_stats, kv_bytes_per_block, measure_memory, num_kv_blocks
from pagedserve.core.sampling import SamplingBatch
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.distributed import parallel_state

if TYPE_CHECKING:
    from pagedserve.core.request import Request

logger = logging.getLogger(__name__)

def dummy_requests(count: int) -> list[Request]:
    """Requests of one prompt token that sample with top-k, top-p and logprobs: the sampler's
    widest work, for the profile step."""
    from pagedserve.core.request import Request

    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20, max_tokens=1)
    return [Request(f"profile-{i}", [0], params) for i in range(count)]



class RunnerStartUp:
    """The start-up half of ``ModelRunner`` (a mixin: it works on the runner's own attributes)."""

    def _kv_cache_dtype(self) -> torch.dtype:
        """The model's dtype, or float8 e4m3 for ``kv_cache_dtype="fp8"`` (whose per-tensor
        scales ``_allocate_kv_caches`` binds to each layer as ``kv_scale``)."""
        return torch.float8_e4m3fn if self.config.cache.kv_cache_dtype == "fp8" else self.dtype

    def _bytes_per_block(self) -> int:
        layers = [(layer.num_kv_heads, layer.head_size) for layer in self.attention_layers]
        return kv_bytes_per_block(layers, self.block_size, self.backend.kv_cache_shape, self.kv_cache_dtype)

    def _num_kv_blocks(self) -> int:
        """The configured size, else on an accelerator what its memory holds after a profile
        step measured the activation peak, else (the CPU) the CPU rule of ``kv_sizing``."""
        per_block = self._bytes_per_block()
        if self.proposer is not None:  # a draft model's KV lives in the same blocks
            per_block += self.proposer.kv_cache_bytes_per_block()
        cache = self.config.cache
        stats = allocator_stats(self.device)
        memory = None
        if stats is not None and cache.num_kv_blocks is None and cache.kv_cache_memory_bytes is None:
            memory = measure_memory(stats, self._profile_step)
        # Every rank sizes its own share; all must hold the same blocks, so the least wins.
        blocks = parallel_state.agree_min(num_kv_blocks(self.config, per_block, memory))
        if memory is not None:
            logger.info("KV cache: %s -> %d blocks of %d bytes", memory.describe(cache.gpu_memory_utilization),
                        blocks, per_block)
        return blocks

    @torch.inference_mode()
    def _profile_step(self) -> None:
        """The largest step the scheduler can make, for the activation peak: a forward over
        ``max_num_batched_tokens`` tokens (on a KV cache just big enough, freed after) and the
        logits and sampling of ``max_num_seqs`` rows with top-k, top-p and logprobs."""
        scheduler = self.config.scheduler
        max_len = int(self.config.model.max_model_len)  # type: ignore[arg-type]
        tokens = min(int(scheduler.max_num_batched_tokens), scheduler.max_num_seqs * max_len)  # type: ignore[arg-type]
        blocks = -(-tokens // self.block_size) + -(-tokens // max_len)
        self.kv_caches = self._allocate_kv_caches(blocks)
        hidden = self._dummy_forward(tokens, blocks)
        rows = min(scheduler.max_num_seqs, hidden.shape[0])
        logits = self.model.compute_logits(hidden[:rows])
        self.sampler(logits, SamplingBatch(dummy_requests(rows), device=self.device))
        del hidden, logits
        self.kv_caches = []
        for layer in self.attention_layers:
            layer.kv_cache = layer.kv_scale = None

    def _allocate_kv_caches(self, num_blocks: int) -> list[torch.Tensor]:
        caches = []
        for layer in self.attention_layers:
            shape = self.backend.kv_cache_shape(num_blocks, self.block_size, layer.num_kv_heads, layer.head_size)
            layer.kv_cache = torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device)
            caches.append(layer.kv_cache)
            if self.config.cache.kv_cache_dtype == "fp8":
                # float32 [2]: the K and V scales (stored = value / scale). 1.0, as vLLM uses for
                # checkpoints without calibrated scales; a tensor, so kernels read it on device.
                layer.kv_scale = torch.ones(2, dtype=torch.float32, device=self.device)
        return caches

    def largest_step_tokens(self) -> int:
        """The most tokens one step can hold under this configuration: the token budget, but no
        more than ``max_num_seqs`` full-length requests and no more than the KV cache holds."""
        config = self.config
        return min(
            config.scheduler.max_num_batched_tokens,  # type: ignore[type-var]
            config.scheduler.max_num_seqs * config.model.max_model_len,  # type: ignore[operator]
            self.num_kv_blocks * self.block_size,
        )

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Run the forward once at the largest step the scheduler can make (``largest_step_tokens``,
        so a one-request configuration warms up at one request's size), as vLLM's profile run
        does: the first step of a large size costs a one-time set-up (likely the allocator mapping
        fresh memory), which the first requests would otherwise pay (a third of a short CPU
        benchmark, measured). With ``torch_compile``, first one token and two: dynamo specialises
        size 1 and compiles one graph with a symbolic token count for every other size. The
        dummy K/V written into the cache are zeroed after (the backend contract)."""
        sizes = [1, 2] if self.config.torch_compile else []
        sizes.append(self.largest_step_tokens())
        for num_tokens in sizes:
            self._dummy_step(num_tokens)
        for kv in self.kv_caches:
            kv.view(torch.uint8).zero_()

    def _dummy_step(self, num_tokens: int) -> None:
        """A dummy forward of ``num_tokens`` on the KV cache, then the logits of a full batch
        of sampled rows."""
        hidden = self._dummy_forward(num_tokens, self.num_kv_blocks)
        self.model.compute_logits(hidden[: self.config.scheduler.max_num_seqs])

    def _dummy_forward(self, num_tokens: int, num_blocks: int) -> torch.Tensor:
        """A forward over fresh requests of zeros, as many tokens as ``num_blocks`` blocks hold,
        up to ``num_tokens``, each request at most ``max_model_len`` long and at most
        ``max_num_seqs`` of them."""
        seqs: list[tuple[list[int], int, int]] = []
        next_block = 0
        while num_tokens > 0 and next_block < num_blocks and len(seqs) < self.config.scheduler.max_num_seqs:
            free_slots = (num_blocks - next_block) * self.block_size
            length = min(num_tokens, self.config.model.max_model_len, free_slots)
            blocks = -(-length // self.block_size)
            seqs.append((list(range(next_block, next_block + blocks)), 0, length))
            next_block += blocks
            num_tokens -= length
        layout = build_batch_layout(seqs, self.block_size, self.device)
        input_ids = torch.zeros(layout.num_tokens, dtype=torch.long, device=self.device)
        with set_forward_context(self.backend, self.backend.build_metadata(layout)):
            return self.forward(input_ids, layout.positions)
