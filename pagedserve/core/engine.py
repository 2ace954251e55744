"""LLMEngine: add requests, step, abort. One step = schedule, run the model, update, detokenize."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from pagedserve.core import pooling
from pagedserve.core.beam_search import BeamSearchGroup, BeamSearchParams
from pagedserve.core.config import ConfigError, EngineConfig
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.lora import LoRAManagerBase, LoRARequest
from pagedserve.core.loader import get_model_max_len, load_generation_config, load_hf_config, resolve_model_path
from pagedserve.core.output_processor import OutputProcessor
from pagedserve.core.outputs import RequestOutput
from pagedserve.core.plugins import PluginManager, get_plugin_manager
from pagedserve.core.pooling import PoolingParams
from pagedserve.core.request import Request, RequestStatus, link_forks
from pagedserve.core.request_group import RequestGroup
from pagedserve.core.sampling import check_token_ids
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.startup import phase, startup
from pagedserve.core.speculative import ProposalBatch, speculation_enabled_for
from pagedserve.core.step_stats import StepStats
from pagedserve.core.tokenizer import IncrementalDetokenizer, bad_words_token_ids, get_eos_token_ids, load_model_tokenizer

logger = logging.getLogger(__name__)

#: How long a step with nothing to run waits for pending preparations before returning (an
#: abort or a new request is seen no later than this).
PENDING_POLL_SECONDS = 0.02

#: A prompt: text, token ids, or vLLM's ``{"prompt_token_ids": [...]}`` / ``{"prompt": "..."}``.
PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    """The synchronous engine. Not thread-safe: one caller steps it."""

    def __init__(self, config: EngineConfig, plugins: PluginManager | None = None) -> None:
        with startup("engine"):
            self._build(config, plugins)

    def _build(self, config: EngineConfig, plugins: PluginManager | None) -> None:
        from pagedserve.core.model_runner import ModelRunnerBase

        self.config = config
        with phase("plugins"):
            self.plugins = plugins or get_plugin_manager()
        model_config = config.model
        with phase("model config"):
            model_config.model_path = resolve_model_path(model_config.model, model_config.revision)
            model_config.hf_config = load_hf_config(model_config.model_path)
            config.finalize(get_model_max_len(model_config.hf_config))
        self.max_model_len: int = model_config.max_model_len  # type: ignore[assignment]

        with phase("tokenizer"):
            self.tokenizer = load_model_tokenizer(model_config)
        self.generation_config = load_generation_config(model_config.model_path)
        self.eos_token_ids = get_eos_token_ids(self.tokenizer, self.generation_config)

        self._shut_down = False
        self.runner: ModelRunnerBase = self._select_runner()(config, self.plugins)
        self.vocab_size = self.runner.vocab_size
        cache = config.cache
        self.kv_cache = KVCacheManager(
            self.runner.num_kv_blocks,
            cache.block_size,
            enable_prefix_caching=cache.enable_prefix_caching,
            hash_fn=self.plugins.registry("prefix_hash_functions").load(cache.prefix_hash),
            eviction_policy=self.plugins.registry("eviction_policies").load(cache.eviction_policy)(),
        )
        policy = self.plugins.registry("scheduling_policies").load(config.scheduler.policy)()
        max_loras = config.lora.max_loras if config.lora.enable_lora else None
        proposer = self.runner.proposer
        lookahead = 0
        if proposer is not None and proposer.needs_lookahead_slots:
            lookahead = config.speculative.num_speculative_tokens  # type: ignore[union-attr]
        self.scheduler = Scheduler(
            config.scheduler, self.kv_cache, policy, self.max_model_len, max_loras,
            num_lookahead_tokens=lookahead,
        )
        self._groups: dict[str, RequestGroup | BeamSearchGroup] = {}
        self.output_processor = OutputProcessor(self._groups, self.scheduler, self.runner, self.plugins)
        self._log_capacity()
        self.plugins.hook.engine_started(engine=self)
        if config.lora.enable_lora and self.lora_manager is None:
            raise ConfigError(
                "enable_lora is set but no LoRA plugin installed a manager on the model runner "
                "(is the 'lora' plugin disabled?)"
            )

    @property
    def lora_manager(self) -> LoRAManagerBase | None:
        """The LoRA plugin's manager (set on the runner at ``engine_started``), or None."""
        return getattr(self.runner, "lora_manager", None)

    def _select_runner(self) -> type:
        registry = self.plugins.registry("model_runners")
        device = self.config.device
        if device.model_runner is not None:
            return registry.load(device.model_runner)
        device_type = device.resolved()
        for entry in sorted(registry.entries(), key=lambda e: (-e.metadata.get("priority", 0), e.name)):
            if device_type in entry.metadata.get("device_types", ()):
                return entry.load()
        raise ValueError(f"no model runner is registered for device {device_type!r}")

    def _log_capacity(self) -> None:
        blocks = self.runner.num_kv_blocks
        tokens = blocks * self.config.cache.block_size
        per_seq = -(-self.max_model_len // self.config.cache.block_size)
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens; max concurrency at max_model_len=%d: %.2fx",
            blocks, self.config.cache.block_size, tokens, self.max_model_len, blocks / per_seq,
        )

    # -- requests --------------------------------------------------------------------------------

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """Text and token ids of a prompt in any accepted form; ValueError for a bad one."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self.validate_token_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty: give at least one character or token")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, (list, tuple)):
            return None, self.validate_token_ids(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, not {type(prompt).__name__}")

    def validate_token_ids(self, token_ids: Sequence[Any]) -> list[int]:
        ids = list(token_ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        for token in ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token!r} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | PoolingParams | None = None,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: Any = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request (PoolingParams: an embedding request); raises ValueError (and
        changes nothing) when it cannot be served.

        With ``lora_request`` the request runs with that adapter, loaded (and checked) now."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(params, PoolingParams):
            if lora_request is not None:
                raise ValueError("embeddings with a LoRA adapter are not supported; embed with the base model")
            self._add_embedding_request(request_id, prompt, params, arrival_time, priority, cache_salt)
            return
        params = params or SamplingParams()
        check_token_ids(params, self.vocab_size)
        text, token_ids = self.tokenize_prompt(prompt)
        token_ids = self._truncate(token_ids, params.truncate_prompt_tokens)
        num_sequences = params.num_sequences
        if num_sequences > self.config.scheduler.max_num_seqs:
            raise ValueError(
                f"{'best_of' if params.best_of is not None else 'n'}={num_sequences} sequences exceed "
                f"max_num_seqs={self.config.scheduler.max_num_seqs}; lower it or raise max_num_seqs"
            )
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}"
            )
        if lora_request is not None:
            self._check_lora(lora_request)
        params = dataclasses.replace(
            params,
            eos_token_ids=self.eos_token_ids,
            stop=list(params.stop or []),
            bad_words_token_ids=bad_words_token_ids(self.tokenizer, params.bad_words or [], self.vocab_size),
        )
        # best_of > n ranks the sequences by cumulative logprob: they need it even when the
        # user asked for no logprobs (the output then still shows none).
        seq_params = params
        if num_sequences > params.n and params.logprobs is None:
            seq_params = dataclasses.replace(params, logprobs=0)
        sequences = [
            Request(
                request_id if num_sequences == 1 else f"{request_id}#{i}",
                token_ids,
                seq_params,
                arrival_time=arrival_time,
                priority=priority,
                cache_salt=cache_salt,
                lora_request=lora_request,
                parent_id=request_id,
                index=i,
            )
            for i in range(num_sequences)
        ]
        leader = link_forks(sequences)
        # Siblings wait for their leader, so only the leader waits for the preparation.
        leader.pending = self.runner.prepare_request(leader, self.tokenizer)
        self.scheduler.add_request(leader)
        detokenizers = [IncrementalDetokenizer(self.tokenizer, token_ids, params) for _ in sequences]
        self._groups[request_id] = RequestGroup(request_id, text, token_ids, sequences, detokenizers, params)

    def add_beam_search_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: BeamSearchParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: Any = None,
    ) -> None:
        """Queue a beam search; its output (the ``beam_width`` best beams) comes when it ends."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        max_new = min(params.max_tokens, self.max_model_len - len(token_ids))
        if max_new < 1:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, leaving no room under max_model_len={self.max_model_len}"
            )
        text_params = SamplingParams(include_stop_str_in_output=params.include_stop_str_in_output)
        group = BeamSearchGroup.build(
            request_id, text, token_ids, params, self.eos_token_ids, max_new,
            lambda: IncrementalDetokenizer(self.tokenizer, token_ids, text_params),
            max_num_seqs=self.config.scheduler.max_num_seqs,
            arrival_time=arrival_time, priority=priority, cache_salt=cache_salt,
        )
        self.scheduler.add_request(group.sequences[0])
        self._groups[request_id] = group

    def _truncate(self, token_ids: list[int], keep: int | None) -> list[int]:
        """vLLM's ``truncate_prompt_tokens``: the last ``keep`` tokens (-1: max_model_len)."""
        if keep is None:
            return token_ids
        keep = self.max_model_len if keep == -1 else keep
        return token_ids[-keep:]

    def _check_lora(self, lora_request: LoRARequest) -> None:
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, not {type(lora_request).__name__}")
        manager = self.lora_manager
        if manager is None:
            raise ValueError(
                f"request asks for LoRA adapter {lora_request.lora_name!r} but this engine was "
                "started without enable_lora=True"
            )
        manager.add_adapter(lora_request)

    def _add_embedding_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: PoolingParams,
        arrival_time: float | None,
        priority: int,
        cache_salt: Any,
    ) -> None:
        """A prefill-only request: scheduled like any other, pooled instead of sampled, done
        (its blocks freed) once its prompt is computed."""
        params.check(int(self.config.model.hf_config.hidden_size))
        text, token_ids = self.tokenize_prompt(prompt)
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}"
            )
        # One slot past the prompt at most (the scheduler's size check); nothing is sampled.
        request = Request(
            request_id, token_ids, SamplingParams(max_tokens=1), arrival_time=arrival_time,
            priority=priority, cache_salt=cache_salt,
        )
        request.pooling_params = params
        request.skip_reading_prefix_cache = self.config.model.pooler_config.pooling_type == "MEAN"
        self.scheduler.add_request(request)
        self._groups[request_id] = RequestGroup(
            request_id, text, token_ids, [request], [], params, pooler=self.config.model.pooler_config
        )

    def abort_request(self, request_ids: str | Sequence[str]) -> None:
        """Abort requests in any state; their KV blocks are freed at once. Unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            group = self._groups.pop(request_id, None)
            if group is None:
                continue
            for seq in group.sequences:
                if not seq.is_finished:
                    self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_ABORTED)
                self.runner.request_finished(seq)
            self.plugins.hook.request_finished(output=group.make_output(force=True))

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -- stepping --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs of the requests that changed (cumulative state)."""
        start = time.perf_counter()
        queries, hits = self.kv_cache.prefix_cache_queries, self.kv_cache.prefix_cache_hits
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.scheduled:
            # Only requests waiting for their preparation (a grammar compiling): sleep on it.
            self.scheduler.wait_for_pending(PENDING_POLL_SECONDS)
        runner_output = self.runner.execute(scheduler_output)
        # Before the update: a request may finish (and leave the scheduler) in this very step.
        for request_id, (start_index, logprobs) in runner_output.prompt_logprobs.items():
            seq = self.scheduler.get_request(request_id)
            if seq is not None:  # a recomputed (preempted) chunk replaces what it covered
                seq.prompt_logprobs[start_index:] = logprobs
        pooling_type = self.config.model.pooler_config.pooling_type
        for request_id, (start_index, partial) in runner_output.pooled.items():
            seq = self.scheduler.get_request(request_id)
            if seq is not None:
                seq.pooled = pooling.combine(pooling_type, seq.pooled, start_index, partial)
        updated = self.scheduler.update_from_output(scheduler_output, runner_output.sampled_token_ids)
        tally = self.output_processor.record(updated, runner_output, time.monotonic())
        if self.runner.proposer is not None:
            self._propose()
        outputs = self.output_processor.make_outputs(tally.touched)

        lora = self.scheduler.max_loras is not None
        self.plugins.hook.step_finished(
            stats=StepStats(
                num_scheduled_tokens=scheduler_output.total_num_scheduled_tokens,
                num_scheduled_seqs=len(scheduler_output.scheduled),
                num_running=self.scheduler.num_running,
                num_waiting=self.scheduler.num_waiting,
                kv_cache_usage=self.kv_cache.usage,
                num_preemptions=len(scheduler_output.preempted),
                step_seconds=time.perf_counter() - start,
                forward_seconds=runner_output.forward_seconds,
                num_prompt_tokens=tally.num_prompt_tokens,
                num_generation_tokens=tally.num_generation_tokens,
                prefix_cache_queries=self.kv_cache.prefix_cache_queries - queries,
                prefix_cache_hits=self.kv_cache.prefix_cache_hits - hits,
                time_to_first_tokens=tally.time_to_first_tokens,
                inter_token_latencies=tally.inter_token_latencies,
                running_lora_adapters=self.scheduler.running_lora_adapters if lora else [],
                waiting_lora_adapters=self.scheduler.waiting_lora_adapters if lora else [],
                spec_decoding=self.scheduler.spec_stats if self.config.speculative else None,
            )
        )
        return outputs

    def _propose(self) -> None:
        """Ask the proposer for the next step's tokens of every decoding request (none above
        ``disable_by_batch_size`` running sequences)."""
        running = self.scheduler.running
        proposer = self.runner.proposer
        assert proposer is not None and self.config.speculative is not None
        if not speculation_enabled_for(self.config, type(proposer), len(running)):
            for request in running:
                request.set_spec_tokens([])
            return
        k = self.config.speculative.num_speculative_tokens
        requests, limits = [], []
        for request in running:
            if request.spec_token_ids or request.num_computed_tokens != request.num_tokens - 1:
                continue  # not scheduled last step (its proposal stands), or still prefilling
            if request.group_chooses_tokens:
                continue  # a beam: its group, not the sampler, picks its next token
            limit = min(k, self.max_model_len - request.num_tokens - 1)
            max_tokens = request.sampling_params.max_tokens
            if max_tokens is not None:
                limit = min(limit, max_tokens - request.num_output_tokens - 1)
            if limit > 0:
                requests.append(request)
                limits.append(limit)
        if not requests:
            return
        for request, draft in zip(requests, self.runner.propose(ProposalBatch(requests, limits))):
            request.set_spec_tokens(list(draft.token_ids), draft.probs)

    def check_health(self) -> None:
        """Raise when the engine can no longer step (a tensor-parallel worker died)."""
        self.runner.check_health()

    def shutdown(self) -> None:
        """Run the ``engine_shutdown`` hooks and stop the runner's processes; idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            self.plugins.hook.engine_shutdown(engine=self)
        finally:
            self.runner.shutdown()
