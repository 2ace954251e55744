"""The token-budget scheduler (vLLM v1 style): no prefill or decode phases, only token counts.

Each step gives every scheduled request a number of new tokens to compute, under one budget of
``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences. Running requests are served
first, then waiting ones in the policy's order, so a long prompt is prefilled in chunks alongside
the decodes. When the KV cache runs out of blocks, the policy's victim is preempted: its blocks
are freed and it is recomputed later (its prefix-cached blocks make that cheap).

A user request with ``n > 1`` arrives as a leader whose siblings wait for it: the leader computes
all of the prompt but its last token, then each sibling forks its blocks (copy-on-write) and all
of them go on as independent requests.

Fair seats: when every seat (``max_num_seqs``) is taken and a request none of whose sequences
runs is waiting, the request running the most sequences gives up its most recently admitted
ones (preempted, recomputed later mostly from the prefix cache) while it keeps more than one. So
the sequences of one request never keep a newcomer waiting more than a step; only
``max_num_seqs`` distinct running requests make it queue.

With LoRA, a step holds at most ``max_loras`` distinct adapters (the base model is none): a
waiting request whose adapter would be one too many stays waiting, and so does every adapter
request queued behind it, so the adapters in use drain and it gets its turn (none starves);
base-model requests pass it.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait

from pagedserve.core.config import SchedulerConfig
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.lora import AdapterLimit, adapter_ids
from pagedserve.core.policies import SchedulingPolicy
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.schedule import ScheduledRequest, SchedulerOutput, StepBuilder
from pagedserve.core.speculative import SpecDecodingStats


class Scheduler:
    """Decides, step by step, which requests compute how many tokens."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        policy: SchedulingPolicy,
        max_model_len: int,
        max_loras: int | None = None,
        num_lookahead_tokens: int = 0,
    ) -> None:
        """``num_lookahead_tokens``: KV slots to hold past a sampling request's scheduled
        tokens, for a draft model to write the KV of the tokens it proposes after the step."""
        if config.max_num_batched_tokens is None:
            raise ValueError(
                "SchedulerConfig.max_num_batched_tokens is not set: call EngineConfig.finalize() "
                "or set it explicitly"
            )
        self.config = config
        self.kv_cache = kv_cache
        self.policy = policy
        self.max_model_len = max_model_len
        #: Distinct LoRA adapters a step may hold; None: LoRA is off (the engine refuses
        #: requests with an adapter).
        self.max_loras = max_loras
        self.num_lookahead_tokens = num_lookahead_tokens
        #: Speculative decoding counts of the last ``update_from_output``.
        self.spec_stats = SpecDecodingStats()
        self.waiting: list[Request] = []
        #: In the order the requests were (re)admitted, the latest last.
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions_total = 0

    # -- requests -----------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request (an ``n > 1`` leader brings its ``fork_children``); ValueError when
        it could never run, whatever else is running."""
        group = [request, *request.fork_children]
        for member in group:
            if member.request_id in self.requests:
                raise ValueError(f"request id {member.request_id!r} is already in use")
        if len(group) > self.config.max_num_seqs:
            raise ValueError(
                f"request {request.request_id!r} asks for n={len(group)} sequences but "
                f"max_num_seqs is {self.config.max_num_seqs}; lower n or raise max_num_seqs"
            )
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: the prompt has {request.num_prompt_tokens} "
                f"tokens, more than max_model_len ({self.max_model_len}); shorten the prompt"
            )
        max_len = self.max_model_len
        if request.max_tokens is not None:
            max_len = min(max_len, request.num_prompt_tokens + request.max_tokens)
        blocks = self.kv_cache.blocks_needed(max_len)
        if blocks > self.kv_cache.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} may need {max_len} tokens = {blocks} KV blocks, "
                f"but the cache has only {self.kv_cache.num_blocks}; lower max_tokens, shorten "
                "the prompt or give the KV cache more memory"
            )
        for sibling in request.fork_children:
            waiting = sibling.status is RequestStatus.WAITING_FOR_FORK
            if sibling.fork_leader is not request or not waiting:
                raise ValueError(
                    f"{sibling.request_id!r} must have fork_leader = {request.request_id!r} and "
                    "status WAITING_FOR_FORK"
                )
        request.status = RequestStatus.WAITING
        for member in group:
            self.requests[member.request_id] = member
        self.waiting.append(request)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def finish_request(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """Finish a request in any state (abort, or a stop string the detokenizer found) and
        free its blocks; None when it is unknown or already finished. A leader finished before
        its siblings forked takes them along as aborted (they stay in its ``fork_children``).

        Call it between steps, not between ``schedule()`` and ``update_from_output()``: a
        scheduled step is assumed to run in full.
        """
        if not status.finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.WAITING_FOR_FORK:
            request.fork_leader.fork_children.remove(request)
        elif request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        for sibling in request.fork_children:
            sibling.status = RequestStatus.FINISHED_ABORTED
            del self.requests[sibling.request_id]
        self._finish(request, status, stop_reason)
        return request

    def _finish(
        self, request: Request, status: RequestStatus, stop_reason: int | str | None
    ) -> None:
        self.kv_cache.free(request)
        request.status = status
        request.stop_reason = stop_reason
        del self.requests[request.request_id]

    # -- state --------------------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def wait_for_pending(self, timeout: float) -> None:
        """Block until some waiting request's pending work finishes, or ``timeout`` seconds:
        the engine calls this when a step had nothing to run, instead of spinning."""
        pending = [future for r in self.waiting for future in r.pending if not future.done()]
        if pending:
            wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Requests not running yet, siblings waiting for their leader's fork included."""
        pending_siblings = sum(len(r.fork_children) for r in (*self.waiting, *self.running))
        return len(self.waiting) + pending_siblings

    @property
    def running_lora_adapters(self) -> list[str]:
        """Names of the adapters of the running requests (those the slots hold)."""
        return sorted(adapter_ids(self.running).values())

    @property
    def waiting_lora_adapters(self) -> list[str]:
        """Names of the adapters only waiting requests ask for."""
        running = adapter_ids(self.running)
        waiting = adapter_ids(self.waiting)
        return sorted(name for lora_id, name in waiting.items() if lora_id not in running)

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens looked up in the prefix cache."""
        return self.kv_cache.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """Tokens found in the prefix cache."""
        return self.kv_cache.prefix_cache_hits

    # -- one step -----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = StepBuilder(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        if self.waiting and not step.preempted:  # preempted: blocks ran short, nothing new this step
            self._make_seats(step)
            self._admit_waiting(step)
        scheduled = list(step.entries.values())
        return SchedulerOutput(
            scheduled=scheduled,
            total_num_scheduled_tokens=sum(s.num_new_tokens for s in scheduled),
            blocks_to_copy=self.kv_cache.take_copies(),
            preempted=step.preempted,
        )

    def _tokens_to_compute(self, request: Request) -> int:
        target = request.fork_point if request.fork_children else request.num_tokens
        return target - request.num_computed_tokens

    def _schedule_running(self, step: StepBuilder) -> None:
        for request in list(self.running):
            if step.budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this step
                continue
            to_compute = self._tokens_to_compute(request)
            num_new = min(to_compute, step.budget)
            if num_new <= 0:
                continue
            num_spec = self._num_spec_tokens(request, to_compute, step.budget)
            samples = request.num_computed_tokens + num_new == request.num_tokens
            lookahead = self.num_lookahead_tokens if samples else 0
            while not self.kv_cache.allocate_slots(
                request, num_new + num_spec, num_lookahead_tokens=lookahead
            ):
                if num_spec or lookahead:  # speculation gives way before anyone is preempted
                    num_spec = lookahead = 0
                    continue
                victim = self.policy.pick_victim(self.running)
                step.unschedule(victim)
                self._preempt(victim)
                step.preempted.append(victim)
                if victim is request:
                    break
            else:
                if num_spec < len(request.spec_token_ids):
                    probs = request.spec_token_probs
                    request.set_spec_tokens(
                        request.spec_token_ids[:num_spec], None if probs is None else probs[:num_spec]
                    )
                step.add(request, num_new + num_spec, num_spec)

    def _num_spec_tokens(self, request: Request, to_compute: int, budget: int) -> int:
        """How many of the request's proposed tokens fit this step: within the budget, and
        never so many that accepting all of them (plus the token sampled after them) would pass
        ``max_tokens`` or ``max_model_len``."""
        if not request.spec_token_ids or to_compute != 1:
            return 0
        limit = min(len(request.spec_token_ids), budget - 1, self.max_model_len - request.num_tokens - 1)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            limit = min(limit, max_tokens - request.num_output_tokens - 1)
        return max(limit, 0)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.set_spec_tokens([])
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.append(request)

    def _seats_by_request(self) -> Counter[str]:
        """Seats held per user request (``parent_id``); a leader holds its siblings' too."""
        seats: Counter[str] = Counter()
        for request in self.running:
            seats[request.parent_id] += 1 + len(request.fork_children)
        return seats

    def _make_seats(self, step: StepBuilder) -> None:
        """Fair seats (see the module docstring): free seats for the first waiting request
        that holds none, from the request holding the most, down to one sequence each."""
        seats = self._seats_by_request()
        newcomers = [r for r in self.waiting if r.parent_id not in seats and r.ready]
        if not newcomers:
            return
        newcomer = min(newcomers, key=self.policy.sort_key)
        missing = sum(seats.values()) + 1 + len(newcomer.fork_children) - self.config.max_num_seqs
        victims = {parent: [r for r in self.running if r.parent_id == parent and not r.fork_children]
                   for parent in seats}
        if missing > sum(min(seats[p] - 1, len(v)) for p, v in victims.items()):
            return  # it cannot get in either way: keep everyone running
        while missing > 0:
            parent = max(victims, key=lambda p: (min(seats[p] - 1, len(victims[p])) > 0, seats[p]))
            victim = victims[parent].pop()
            step.unschedule(victim)
            self._preempt(victim)
            step.preempted.append(victim)
            seats[parent] -= 1
            missing -= 1

    def _admit_waiting(self, step: StepBuilder) -> None:
        seats_by_request = self._seats_by_request()
        seats = sum(seats_by_request.values())
        # Requests holding no seat first (fair seats), each part in the policy's order.
        self.waiting.sort(key=lambda r: (r.parent_id in seats_by_request, self.policy.sort_key(r)))
        # Requests whose pending work is not done keep their places; the others pass them.
        ready = [r.ready for r in self.waiting]
        not_ready = [r for r, ok in zip(self.waiting, ready) if not ok]
        if not_ready:
            self.waiting = [r for r, ok in zip(self.waiting, ready) if ok]
        try:
            self._admit_ready(step, seats)
        finally:
            self.waiting[:0] = not_ready

    def _admit_ready(self, step: StepBuilder, seats: int) -> None:
        adapters = AdapterLimit(self.max_loras, self.running)
        index = 0
        while index < len(self.waiting) and step.budget > 0:
            request = self.waiting[index]
            if not adapters.admits(request):
                index += 1
                continue
            group_size = 1 + len(request.fork_children)
            if seats + group_size > self.config.max_num_seqs:
                break
            hits, num_hit_tokens = self.kv_cache.get_computed_blocks(request)
            if request.fork_children and num_hit_tokens == request.fork_point:
                # Everything up to the fork point is cached: fork now, then each sequence
                # computes the last prompt token itself.
                if not self.kv_cache.allocate_slots(request, 0, hits, num_hit_tokens):
                    break
                self._start(request, num_hit_tokens)
                siblings = self._fork(request)
                for member in (request, *siblings):
                    self._schedule_without_preemption(step, member)
                seats += group_size
                continue
            num_new = min(self._tokens_to_compute(request) - num_hit_tokens, step.budget)
            # Lookahead slots (for a draft's proposals after this step) only when they fit.
            lookahead = self.num_lookahead_tokens if num_hit_tokens + num_new == request.num_tokens else 0
            if not (
                (lookahead and self.kv_cache.allocate_slots(request, num_new, hits, num_hit_tokens, lookahead))
                or self.kv_cache.allocate_slots(request, num_new, hits, num_hit_tokens)
            ):
                break
            self._start(request, num_hit_tokens)
            step.add(request, num_new)
            seats += group_size

    def _start(self, request: Request, num_computed_tokens: int) -> None:
        self.waiting.remove(request)
        if request.first_scheduled_time is None:
            request.num_cached_tokens = num_computed_tokens
        request.num_computed_tokens = num_computed_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def _schedule_without_preemption(self, step: StepBuilder, request: Request) -> None:
        num_new = min(self._tokens_to_compute(request), step.budget)
        if num_new > 0 and self.kv_cache.allocate_slots(request, num_new):
            step.add(request, num_new)

    def _fork(self, leader: Request) -> list[Request]:
        """Start every sibling of ``leader`` (at its fork point) on the leader's blocks."""
        siblings, leader.fork_children = leader.fork_children, []
        for sibling in siblings:
            self.kv_cache.fork(leader, sibling)
            sibling.num_computed_tokens = leader.num_computed_tokens
            sibling.num_cached_tokens = leader.num_cached_tokens
            sibling.status = RequestStatus.RUNNING
            self.running.append(sibling)
        return siblings

    def fork_into(self, parent: Request, target: Request) -> None:
        """Make ``target``, a running or preempted sequence, continue from ``parent``'s computed
        tokens (a beam search beam taking a dropped beam's seat): its own blocks are freed at
        once, then it shares the parent's copy-on-write. If either is not running (preempted),
        the target is preempted and will recompute. The caller then sets its tokens."""
        running = RequestStatus.RUNNING
        if parent.status is running and target.status is running:
            self.kv_cache.free(target)
            self.kv_cache.fork(parent, target)
            target.num_computed_tokens = parent.num_computed_tokens
            return
        if target.status is running:
            self._preempt(target)
        target.block_hashes = []  # of its old tokens

    # -- after the model ran ------------------------------------------------------------------

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: dict[str, int | list[int]]
    ) -> list[Request]:
        """Record the step: computed tokens advance, sampled tokens are appended, finished
        requests are freed. Returns the requests that got a token or finished.

        A request sampled one token, or (when it carried proposed tokens) a list: the proposals
        the verifier accepted, then the token it sampled after them. Tokens are appended one by
        one, each checked for a stop, so speculation never runs past one."""
        changed = []
        self.spec_stats = SpecDecodingStats()
        for entry in output.scheduled:
            request = entry.request
            if request.status is not RequestStatus.RUNNING:
                continue
            request.num_computed_tokens += entry.num_new_tokens
            if request.fork_children and request.num_computed_tokens == request.fork_point:
                self._fork(request)
            if not entry.sample:
                continue
            if request.pooling_params is not None:  # prefill only: done with its prompt
                self.running.remove(request)
                self._finish(request, RequestStatus.FINISHED_STOPPED, None)
                changed.append(request)
                continue
            if request.group_chooses_tokens:
                changed.append(request)  # its group picks the token (see fork_into)
                continue
            try:
                token = sampled_token_ids[request.request_id]
            except KeyError:
                raise ValueError(
                    f"no sampled token for {request.request_id!r}, which was scheduled to sample"
                ) from None
            tokens = [token] if isinstance(token, int) else token
            if entry.num_spec_tokens or len(tokens) != 1:
                self._roll_back_rejected(entry, tokens)
            if request.spec_token_ids:  # proposed for a history that now changes
                request.set_spec_tokens([])
            num_tokens_before = request.num_tokens
            for token in tokens:
                request.append_output_token(token)
                status, stop_reason = self._check_stop(request, token)
                if status is not None:
                    self.running.remove(request)
                    self._finish(request, status, stop_reason)
                    break
            else:
                if len(tokens) > 1:
                    self.kv_cache.cache_computed_blocks(request, num_tokens_before)
            changed.append(request)
        return changed

    def _roll_back_rejected(self, entry: ScheduledRequest, tokens: list[int]) -> None:
        """Take back the computed tokens of the rejected proposals and count the verification."""
        request = entry.request
        num_accepted = len(tokens) - 1
        if not 0 <= num_accepted <= entry.num_spec_tokens:
            raise ValueError(
                f"{request.request_id!r} got {len(tokens)} tokens for "
                f"{entry.num_spec_tokens} proposed ones"
            )
        request.num_computed_tokens -= entry.num_spec_tokens - num_accepted
        request.num_spec_drafts += 1
        request.num_spec_draft_tokens += entry.num_spec_tokens
        request.num_spec_accepted_tokens += num_accepted
        self.spec_stats.observe(entry.num_spec_tokens, num_accepted)

    def _check_stop(self, request: Request, token: int) -> tuple[RequestStatus | None, int | None]:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token in params.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED, None
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED, token
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH, None
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None
