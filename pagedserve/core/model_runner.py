"""The model runner: flat batch tensors, the paged KV tensors, one model call and one sampler call
per step.

Runners are registered per device family (``register_model_runners``); this one serves any device
PyTorch runs on natively (CPU, CUDA).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pagedserve.core.config import ConfigError, EngineConfig
from pagedserve.core.forward_context import build_batch_layout, set_forward_context
from pagedserve.core.cuda_graphs import PaddedDecode, capture_sizes, cuda_graph_reason
from pagedserve.core.kv_sizing import DeviceMemory, allocator_stats, kv_bytes_per_block, measure_memory, num_kv_blocks
from pagedserve.core.layers.attention import Attention, AttentionBackend
from pagedserve.core.loader import load_model
from pagedserve.core.lora import LoRAManagerBase
from pagedserve.core.plugins import PluginManager, Registry
from pagedserve.core.rejection_sampler import verify
from pagedserve.core.pooling import pool_chunk
from pagedserve.core.sampling import SamplingBatch, TokenLogprobs, build_sampler, compute_prompt_logprobs, host_to_device
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.startup import phase
from pagedserve.core.speculative import DraftTokens, ProposalBatch, Proposer
from pagedserve.distributed import parallel_state
from pagedserve.distributed.workers import WorkerGroup

if TYPE_CHECKING:
    from pagedserve.core.request import Request
    from pagedserve.core.scheduler import SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    """Per request id: the sampled token, its logprobs, and the prompt logprobs of this chunk
    (with the index, among the prompt's scored tokens 1.., of the chunk's first entry). A
    request that carried proposed tokens gets lists: the accepted proposals, then the token
    sampled after them, and their logprobs."""

    sampled_token_ids: dict[str, int | list[int]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs | list[TokenLogprobs]] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    #: Per embedding request: the prompt position its chunk started at and the chunk's share of
    #: the pooled hidden state (see ``core/pooling.py``).
    pooled: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    #: Wall time of the model forward and the sampled rows' logits (the engine-overhead baseline).
    forward_seconds: float = 0.0


class StepTimer:
    """The wall time of a step's forward (and its sampled rows' logits), the engine-overhead
    baseline. On CUDA it is read from two events after the step's one device-to-host copy, so
    timing adds no synchronisation of its own."""

    def __init__(self, device: torch.device) -> None:
        self.events = None
        self.start = time.perf_counter()
        if device.type == "cuda":
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        self.seconds = 0.0

    def forward_done(self) -> None:
        if self.events is None:
            self.seconds = time.perf_counter() - self.start
        else:
            self.events[1].record()

    def forward_seconds(self) -> float:
        if self.events is None:
            return self.seconds
        self.events[1].synchronize()  # done already when the step copied sampled tokens back
        return self.events[0].elapsed_time(self.events[1]) / 1000


def dummy_requests(count: int) -> list[Request]:
    """Requests of one prompt token that sample with top-k, top-p and logprobs: the sampler's
    widest work, for the profile step."""
    from pagedserve.core.request import Request

    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, logprobs=20, max_tokens=1)
    return [Request(f"profile-{i}", [0], params) for i in range(count)]


@dataclass
class ForwardBatch:
    """The part of a step every tensor-parallel rank runs, in plain lists (cheap to send): block
    copies, the forward, the logits of the sampled rows and of the prompt-logprobs rows."""

    token_ids: list[int] = field(default_factory=list)
    #: Per scheduled request: (block ids, first position, tokens this step).
    seqs: list[tuple[list[int], int, int]] = field(default_factory=list)
    #: The padded batch size of a decode-only step (None: the step runs eagerly).
    padded_size: int | None = None
    #: Rows whose logits the step samples or verifies, and rows that score prompt tokens.
    logits_rows: list[int] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class ForwardResult:
    hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None


class ModelRunnerBase(ABC):
    """What the engine needs from a runner: its KV capacity and one ``execute`` per step."""

    num_kv_blocks: int
    vocab_size: int
    #: Installed by a LoRA plugin when the engine starts with ``enable_lora``.
    lora_manager: LoRAManagerBase | None = None
    #: The speculative-decoding proposer, when ``speculative_config`` is set.
    proposer: Proposer | None = None

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...

    def prepare_request(self, request: Request, tokenizer: Any) -> list[Future]:
        """Check a new request against the sampler's logits processors (ValueError) and start
        their preparation; the request waits for the returned futures."""
        return []

    def propose(self, batch: ProposalBatch) -> list[DraftTokens]:
        """Proposals for the next step (after ``execute`` and the scheduler's update)."""
        return [DraftTokens([]) for _ in batch.requests]

    def request_finished(self, request: Request) -> None:
        """A request finished or was aborted (the proposer drops what it kept for it)."""

    def check_health(self) -> None:
        """Raise when the runner can no longer run steps (a tensor-parallel worker died)."""

    def shutdown(self) -> None:
        """Release what the runner started (worker processes); called once, at engine shutdown."""


def select_attention_backend(config: EngineConfig, registry: Registry) -> type[AttentionBackend]:
    """The configured backend, or the highest-priority one whose ``supports(config)`` is None."""
    if config.attention_backend is not None:
        cls = registry.load(config.attention_backend)
        reason = cls.supports(config)
        if reason is not None:
            raise ConfigError(f"attention backend {config.attention_backend!r} cannot run here: {reason}")
        return cls
    entries = sorted(registry.entries(), key=lambda e: (-e.metadata.get("priority", 0), e.name))
    reasons = []
    for entry in entries:
        cls = entry.load()
        reason = cls.supports(config)
        if reason is None:
            return cls
        reasons.append(f"{entry.name}: {reason}")
    raise ConfigError("no attention backend supports this configuration (" + "; ".join(reasons) + ")")


class ModelRunner(ModelRunnerBase):
    """Runs a pagedserve model on one PyTorch device."""

    def __init__(self, config: EngineConfig, plugins: PluginManager) -> None:
        self.config = config
        #: Rank 0 of a tensor-parallel engine starts the other ranks (a worker's own runner is
        #: built after its process joined the group, and starts none).
        self.workers: WorkerGroup | None = None
        if config.parallel.tensor_parallel_size == 1:
            with parallel_state.assumed_rank(0, 1):  # even beside a tensor-parallel engine
                self._build(config, plugins)
        elif not parallel_state.is_worker_process():
            self.workers = WorkerGroup(config)
            try:
                self._build(config, plugins)
            except BaseException as exc:
                error = self.workers.error_for(exc)
                self.workers.shutdown()
                if error is exc:
                    raise
                raise error from exc
        else:
            self._build(config, plugins)

    def _build(self, config: EngineConfig, plugins: PluginManager) -> None:
        self.device = torch.device(config.device.resolved())
        self.block_size = config.cache.block_size
        with phase("weights"):
            self.model = load_model(config.model, config.quantization, self.device.type)
        hf_config = config.model.hf_config
        self.vocab_size = int(hf_config.vocab_size)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.attention_layers.sort(key=lambda layer: layer.layer_index)
        self.dtype = next(self.model.parameters()).dtype
        self.pooling_type = config.model.pooler_config.pooling_type

        backend_cls = select_attention_backend(config, plugins.registry("attention_backends"))
        self.backend = backend_cls(config)
        self.sampler = build_sampler(config.sampler, self.vocab_size, self.device, config.model.seed, plugins,
                                     config.logits_processors)
        self.proposer = self._build_proposer(plugins) if config.speculative is not None else None
        #: Per request id: the target's hidden state at the row that gave its last token, for a
        #: proposer that reads hidden states.
        self._last_hidden: dict[str, torch.Tensor] = {}
        self.kv_cache_dtype = self._kv_cache_dtype()
        self.forward = torch.compile(self.model, dynamic=True) if config.torch_compile else self.model

        #: Why decode steps are not CUDA graphs here (None: they are captured).
        self.cuda_graph_reason = cuda_graph_reason(config, self.device, self.backend)
        pad = self.cuda_graph_reason is None or (self.device.type != "cuda" and config.cuda_graph_sizes is not None)
        with phase("KV cache"):
            self.num_kv_blocks = self._num_kv_blocks()
            # Padded decode rows write their K/V into one block beyond the scheduler's.
            self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks + pad)
        if self.proposer is not None:
            self.proposer.allocate_kv_cache(self.num_kv_blocks)
        with phase("compile and warm-up" if config.torch_compile else "warm-up"):
            self._warm_up()
        self.padded_decode: PaddedDecode | None = None
        if pad:
            self.padded_decode = PaddedDecode(
                config, capture_sizes(config), self.backend, self.forward, self.num_kv_blocks, self.device,
                capture=self.cuda_graph_reason is None,
            )
            if self.cuda_graph_reason is None:
                with phase("CUDA graph capture"):
                    try:
                        self.padded_decode.capture_all()
                    except RuntimeError as exc:  # an op that cannot be captured (a host sync)
                        raise ConfigError(
                            f"capturing the decode step as a CUDA graph failed ({exc}); "
                            "start with enforce_eager=True (--enforce-eager)"
                        ) from exc
        elif self.device.type == "cuda":
            logger.info("decode steps run eagerly: %s", self.cuda_graph_reason)

    def _build_proposer(self, plugins: PluginManager) -> Proposer:
        method = self.config.speculative.method  # type: ignore[union-attr]
        registry = plugins.registry("speculative_proposers")
        if method not in registry:
            known = ", ".join(registry.names()) or "none"
            raise ConfigError(
                f"speculative_config method {method!r} is not registered; known: {known}"
            )
        return registry.load(method)(self.config, self)

    # -- KV cache --------------------------------------------------------------------------------

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

    def prepare_request(self, request: Request, tokenizer: Any) -> list[Future]:
        return self.sampler.prepare_request(request, tokenizer)

    # -- one step --------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        scheduled = scheduler_output.scheduled
        output = RunnerOutput()
        if not scheduled:
            if scheduler_output.blocks_to_copy:
                self.run_forward(ForwardBatch(blocks_to_copy=list(scheduler_output.blocks_to_copy)))
            return output

        token_ids: list[int] = []
        seqs = []
        sample_rows: list[int] = []
        # Requests verifying proposals, and their 1 + k rows each (after sample_rows).
        spec_requests: list[Request] = []
        spec_rows: list[int] = []
        # (request id, start, first row, targets, k): logits at position p score prompt token p + 1.
        prompt_rows: list[tuple[str, int, int, list[int], int]] = []
        # (request, start, first row, rows, last chunk) of embedding requests: pooled, not sampled.
        pool_rows: list[tuple[str, int, int, int, bool]] = []
        for item in scheduled:
            req, start, count = item.request, item.request.num_computed_tokens, item.num_new_tokens
            first = len(token_ids)
            num_spec = item.num_spec_tokens
            token_ids.extend(req.all_token_ids[start : start + count - num_spec])
            token_ids.extend(req.spec_token_ids[:num_spec])
            seqs.append((req.block_ids, start, count))
            if req.pooling_params is not None:
                pool_rows.append((req.request_id, start, first, count, item.sample))
                continue
            if item.sample and num_spec:
                spec_requests.append(req)
                spec_rows.extend(range(first + count - 1 - num_spec, first + count))
            elif item.sample:
                sample_rows.append(first + count - 1)
            k = req.sampling_params.prompt_logprobs
            if k is not None and start < req.num_prompt_tokens - 1:
                end = min(start + count, req.num_prompt_tokens - 1)
                targets = req.prompt_token_ids[start + 1 : end + 1]
                prompt_rows.append((req.request_id, start, first, targets, k))

        batch = ForwardBatch(
            token_ids,
            seqs,
            padded_size=self._padded_size(scheduler_output, len(token_ids)),
            logits_rows=sample_rows + spec_rows,
            prompt_rows=[row for _, _, first, targets, _ in prompt_rows for row in range(first, first + len(targets))],
            blocks_to_copy=list(scheduler_output.blocks_to_copy),
        )
        lora_requests = [item.request.lora_request for item in scheduled] if self.lora_manager else None
        timer = StepTimer(self.device)
        result = self.run_forward(batch, lora_requests, timer)
        hidden, all_logits = result.hidden, result.logits
        if all_logits is not None:
            sample_logits = all_logits[: len(sample_rows)]
        if prompt_rows:
            output.prompt_logprobs.update(self._prompt_logprobs(result.prompt_logits, prompt_rows))

        for request_id, start, first, count, last in pool_rows:
            partial = pool_chunk(self.pooling_type, hidden[first : first + count], last)
            if partial is not None:
                output.pooled[request_id] = (start, partial)

        keep_hidden = self.proposer is not None and self.proposer.uses_hidden_states
        if sample_rows:
            requests = [
                item.request
                for item in scheduled
                if item.sample and not item.num_spec_tokens and item.request.pooling_params is None
            ]
            sampled = self.sampler(sample_logits, SamplingBatch(requests, device=self.device))
            for req, token, logprobs, row in zip(requests, sampled.token_ids, sampled.logprobs, sample_rows):
                output.sampled_token_ids[req.request_id] = token
                if logprobs is not None:
                    output.logprobs[req.request_id] = logprobs
                if keep_hidden:
                    self._last_hidden[req.request_id] = hidden[row].clone()
        if spec_requests:
            verified = verify(self.sampler, all_logits[len(sample_rows) :], spec_requests, self.device)
            first_row = 0
            for req, result in zip(spec_requests, verified):
                output.sampled_token_ids[req.request_id] = result.token_ids
                if result.logprobs is not None:
                    output.logprobs[req.request_id] = result.logprobs
                if keep_hidden:
                    row = spec_rows[first_row + len(result.token_ids) - 1]
                    self._last_hidden[req.request_id] = hidden[row].clone()
                first_row += len(req.spec_token_ids) + 1
        output.forward_seconds = timer.forward_seconds()
        return output

    @torch.inference_mode()
    def run_forward(
        self, batch: ForwardBatch, lora_requests: list[Any] | None = None, timer: StepTimer | None = None
    ) -> ForwardResult:
        """What every tensor-parallel rank runs of a step: rank 0 first sends ``batch`` to the
        workers, which make the same call (the layers' collectives pair up); a worker that died
        meanwhile turns the collective's error into ``WorkerFailedError``."""
        if self.workers is None:
            return self._run_forward(batch, lora_requests, timer)
        try:
            self.workers.send_step(batch)
            return self._run_forward(batch, lora_requests, timer)
        except RuntimeError as exc:
            error = self.workers.error_for(exc)
            if error is exc:
                raise
            raise error from exc

    def _run_forward(
        self, batch: ForwardBatch, lora_requests: list[Any] | None, timer: StepTimer | None
    ) -> ForwardResult:
        if batch.blocks_to_copy:
            pairs = host_to_device(batch.blocks_to_copy, torch.long, self.device)
            self.backend.copy_blocks(self.kv_caches, pairs)
        result = ForwardResult()
        if not batch.seqs:
            return result
        if batch.padded_size is not None:
            positions = [start for _, start, _ in batch.seqs]
            block_ids = [s[0] for s in batch.seqs]
            result.hidden = self.padded_decode.run(batch.token_ids, positions, block_ids, batch.padded_size)  # type: ignore[union-attr]
        else:
            result.hidden = self._eager_forward(lora_requests, batch.token_ids, batch.seqs)
        if batch.logits_rows:
            rows = host_to_device(batch.logits_rows, torch.long, self.device)
            result.logits = self.model.compute_logits(result.hidden[rows])
        if timer is not None:
            timer.forward_done()
        if batch.prompt_rows:
            rows = host_to_device(batch.prompt_rows, torch.long, self.device)
            result.prompt_logits = self.model.compute_logits(result.hidden[rows])
        return result

    def _prompt_logprobs(
        self, logits: torch.Tensor, prompt_rows: list[tuple[str, int, int, list[int], int]]
    ) -> dict[str, tuple[int, list[TokenLogprobs]]]:
        """The prompt logprobs of every request that asked, from the step's one logits call for
        them and one device-to-host copy."""
        targets = [token for *_, chunk, _ in prompt_rows for token in chunk]
        wanted = [k for *_, chunk, k in prompt_rows for _ in chunk]
        entries = compute_prompt_logprobs(logits, host_to_device(targets, torch.long, self.device), wanted)
        result, start = {}, 0
        for request_id, position, _, chunk, _ in prompt_rows:
            result[request_id] = (position, entries[start : start + len(chunk)])
            start += len(chunk)
        return result

    def _padded_size(self, scheduler_output: SchedulerOutput, num_tokens: int) -> int | None:
        """The padded batch size of a decode-only step (every request one new token, none an
        embedding), None when the step runs eagerly."""
        if self.padded_decode is None or self.lora_manager is not None:
            return None
        if num_tokens != len(scheduler_output.scheduled):
            return None
        if any(item.request.pooling_params is not None for item in scheduler_output.scheduled):
            return None
        return self.padded_decode.padded_size(num_tokens)

    def _eager_forward(
        self, lora_requests: list[Any] | None, token_ids: list[int], seqs: list[tuple[list[int], int, int]]
    ) -> torch.Tensor:
        """The forward of any step, its inputs laid out fresh."""
        layout = build_batch_layout(seqs, self.block_size, self.device)
        input_ids = host_to_device(token_ids, torch.long, self.device)
        metadata = self.backend.build_metadata(layout)
        lora_mapping = None
        if self.lora_manager is not None and lora_requests is not None:
            lora_mapping = self.lora_manager.prepare_step(lora_requests, layout.query_lens_list)
        with set_forward_context(self.backend, metadata, lora_mapping):
            return self.forward(input_ids, layout.positions)

    # -- speculative decoding --------------------------------------------------------------------

    @torch.inference_mode()
    def propose(self, batch: ProposalBatch) -> list[DraftTokens]:
        if self.proposer is None:
            return super().propose(batch)
        if self.proposer.uses_hidden_states:
            batch.hidden_states = {
                r.request_id: self._last_hidden[r.request_id]
                for r in batch.requests
                if r.request_id in self._last_hidden
            }
        return self.proposer.propose(batch)

    def check_health(self) -> None:
        if self.workers is not None:
            self.workers.check()

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()

    def request_finished(self, request: Request) -> None:
        self._last_hidden.pop(request.request_id, None)
        if self.proposer is not None:
            self.proposer.request_finished(request)
