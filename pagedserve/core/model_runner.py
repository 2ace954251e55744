"""The model runner: flat batch tensors, the paged KV tensors, one model call and one sampler call
per step.

Runners are registered per device family (``register_model_runners``); this one serves any device
PyTorch runs on natively (CPU, CUDA).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from pagedserve.core.compiled_decode import compiled_decode_steps, default_compile_sizes
from pagedserve.core.config import ConfigError, EngineConfig
from pagedserve.core.cuda_graphs import PaddedDecode, capture_sizes, cuda_graph_reason
from pagedserve.core.forward_context import build_batch_layout, set_forward_context
from pagedserve.core.layers.attention import Attention, AttentionBackend
from pagedserve.core.host_malloc import keep_freed_memory
from pagedserve.core.layers.cpu_gemm import packs_dense_weights, prepack_dense_linears
from pagedserve.core.loader import load_model
from pagedserve.core.plugins import PluginManager, Registry
from pagedserve.core.pooling import pool_chunk
from pagedserve.core.rejection_sampler import verify
from pagedserve.core.runner_base import ForwardBatch, ForwardResult, ModelRunnerBase, RunnerOutput, StepTimer
from pagedserve.core.runner_start import RunnerStartUp
from pagedserve.core.sampling import SamplingBatch, TokenLogprobs, build_sampler, compute_prompt_logprobs, host_to_device
from pagedserve.core.speculative import DraftTokens, ProposalBatch, Proposer
from pagedserve.core.startup import phase
from pagedserve.core.step_plan import plan_step
from pagedserve.distributed import parallel_state
from pagedserve.distributed.workers import WorkerGroup

if TYPE_CHECKING:
    from pagedserve.core.request import Request
    from pagedserve.core.schedule import SchedulerOutput

__all__ = ["ModelRunner", "ModelRunnerBase", "select_attention_backend"]

logger = logging.getLogger(__name__)


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


class ModelRunner(RunnerStartUp, ModelRunnerBase):
    """Runs a pagedserve model on one PyTorch device (its start-up half in ``runner_start``)."""

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
        if config.compilation_level == 3 and self.device.type != "cpu":
            raise ConfigError(
                f"compilation_config level 3 compiles the CPU decode step; on {self.device.type!r} "
                "decode steps are CUDA graphs already: drop compilation_config"
            )
        if self.device.type == "cpu":
            keep_freed_memory()
        self.block_size = config.cache.block_size
        with phase("weights"):
            self.model = load_model(config.model, config.quantization, self.device.type)
            if packs_dense_weights(config, self.device):
                prepack_dense_linears(self.model)
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
        compiled = config.compilation_level == 3
        cpu_padded = self.device.type != "cuda" and (config.cuda_graph_sizes is not None or compiled)
        pad = self.cuda_graph_reason is None or cpu_padded
        with phase("KV cache"):
            self.num_kv_blocks = self._num_kv_blocks()
            # Padded decode rows write their K/V into one block beyond the scheduler's.
            self.kv_caches = self._allocate_kv_caches(self.num_kv_blocks + pad)
        if self.proposer is not None:
            self.proposer.allocate_kv_cache(self.num_kv_blocks)
        with phase("compile and warm-up" if config.torch_compile else "warm-up"):
            self._warm_up()
        self.padded_decode: PaddedDecode | None = None
        if compiled:
            sizes = capture_sizes(config) if config.cuda_graph_sizes else default_compile_sizes(
                config.scheduler.max_num_seqs)
            # Without sizes asked for, each batch runs at its own size (``PaddedDecode.exact``).
            self.padded_decode = compiled_decode_steps(config, self.model, self.backend, sizes, self.num_kv_blocks,
                                                       self.device, exact=not config.cuda_graph_sizes)
            with phase("decode step compile"), torch.inference_mode():
                self.padded_decode.compile_all()
        elif pad:
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

        plan = plan_step(scheduled)
        batch = ForwardBatch(
            plan.token_ids,
            plan.seqs,
            padded_size=self._padded_size(scheduler_output, len(plan.token_ids)),
            logits_rows=plan.sample_rows + plan.spec_rows,
            prompt_rows=plan.prompt_logits_rows,
            blocks_to_copy=list(scheduler_output.blocks_to_copy),
        )
        lora_requests = [item.request.lora_request for item in scheduled] if self.lora_manager else None
        timer = StepTimer(self.device)
        result = self.run_forward(batch, lora_requests, timer)
        hidden, all_logits = result.hidden, result.logits
        if plan.prompt_rows:
            output.prompt_logprobs.update(self._prompt_logprobs(result.prompt_logits, plan.prompt_rows))

        for request_id, start, first, count, last in plan.pool_rows:
            partial = pool_chunk(self.pooling_type, hidden[first : first + count], last)
            if partial is not None:
                output.pooled[request_id] = (start, partial)

        keep_hidden = self.proposer is not None and self.proposer.uses_hidden_states
        sample_rows, spec_rows, spec_requests = plan.sample_rows, plan.spec_rows, plan.spec_requests
        if sample_rows:
            requests = plan.sample_requests
            sampled = self.sampler(all_logits[: len(sample_rows)], SamplingBatch(requests, device=self.device))
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
