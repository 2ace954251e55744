"""Hypothesis drives the scheduler with random pools, budgets, arrivals, n > 1 groups and aborts,
and checks every step's invariants and the tokens generated.

The fake runner computes each sampled token from the KV slots it reads back through the block
ids, so any scheduling or block-table mistake shows up as a token that differs from the
reference generation.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve.core.config import SchedulerConfig
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.scheduler import Scheduler
from pagedserve.plugins.policies.scheduling import FCFSPolicy, PriorityPolicy

from fake_model import FakeRunner, reference_tokens

MAX_MODEL_LEN = 24
VOCAB = 11
PREFIXES = [[], [1, 2, 3, 4], [5, 6, 7, 8, 9, 10]]


add_events = st.tuples(
    st.just("add"),
    st.builds(
        lambda prefix, tail: prefix + tail,
        st.sampled_from(PREFIXES),
        st.lists(st.integers(0, 10), max_size=8),
    ),
    st.integers(1, 10),  # max_tokens
    st.integers(0, 2),  # priority
    st.integers(1, 3),  # n
).filter(lambda event: event[1])
events = st.lists(
    st.one_of(
        add_events,
        add_events,  # twice: arrivals outnumber aborts
        st.tuples(st.just("abort"), st.integers(0, 40)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=3,
    max_size=40,
)


class Harness:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.kv = scheduler.kv_cache
        self.runner = FakeRunner(self.kv, VOCAB)
        self.members: list[Request] = []
        self.aborted: set[str] = set()
        self.ids = itertools.count()

    def add(self, prompt: list[int], max_tokens: int, priority: int, n: int) -> None:
        params = SamplingParams(n=n, max_tokens=max_tokens)
        parent = f"req{next(self.ids)}"
        leader = Request(f"{parent}-0", prompt, params, priority=priority, parent_id=parent)
        for index in range(1, n):
            sibling = Request(
                f"{parent}-{index}", prompt, params, priority=priority, parent_id=parent, index=index
            )
            sibling.fork_leader = leader
            sibling.status = RequestStatus.WAITING_FOR_FORK
            leader.fork_children.append(sibling)
        needed = self.kv.blocks_needed(min(len(prompt) + max_tokens, MAX_MODEL_LEN))
        fits = needed <= self.kv.num_blocks and n <= self.scheduler.config.max_num_seqs
        try:
            self.scheduler.add_request(leader)
        except ValueError:
            assert not fits
            return
        assert fits
        self.members += [leader, *leader.fork_children]

    def abort(self, index: int) -> None:
        if not self.members:
            return
        request = self.members[index % len(self.members)]
        if self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED):
            self.aborted.add(request.request_id)
            self.aborted.update(s.request_id for s in request.fork_children)

    def step(self) -> None:
        scheduler, config = self.scheduler, self.scheduler.config
        output = scheduler.schedule()
        assert output.total_num_scheduled_tokens == sum(s.num_new_tokens for s in output.scheduled)
        assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
        assert len(output.scheduled) <= config.max_num_seqs
        assert len({s.request.request_id for s in output.scheduled}) == len(output.scheduled)
        if scheduler.has_unfinished_requests() and not output.preempted:
            assert output.scheduled, "a step with work to do scheduled nothing"
        for entry in output.scheduled:
            request = entry.request
            assert request.status is RequestStatus.RUNNING and entry.num_new_tokens > 0
            end = request.num_computed_tokens + entry.num_new_tokens
            assert len(request.block_ids) * self.kv.block_size >= end
            assert entry.sample == (end == request.num_tokens)
        for request in output.preempted:
            assert request.status is RequestStatus.PREEMPTED and request.block_ids == []
        self.check_blocks()
        scheduler.update_from_output(output, self.runner.execute(output))
        assert scheduler.num_running <= config.max_num_seqs
        self.check_blocks()

    def check_blocks(self) -> None:
        owners = [0] * self.kv.num_blocks
        for request in self.scheduler.running:
            assert len(request.block_ids) * self.kv.block_size >= request.num_computed_tokens
            for block in request.block_ids:
                owners[block] += 1
        for request in self.scheduler.waiting:
            assert request.block_ids == [] and request.num_computed_tokens == 0
        assert self.kv.pool.ref_counts == owners

    def finish(self) -> None:
        for _ in range(2000):
            if not self.scheduler.has_unfinished_requests():
                break
            self.step()
        assert not self.scheduler.has_unfinished_requests(), "no progress"
        assert self.kv.num_used_blocks == 0 and self.kv.num_free_blocks == self.kv.num_blocks
        for request in self.members:
            assert request.is_finished and request.block_ids == []
            length = min(request.max_tokens, MAX_MODEL_LEN - request.num_prompt_tokens)
            expected = reference_tokens(request.prompt_token_ids, length, VOCAB)
            if request.request_id in self.aborted:
                assert request.status is RequestStatus.FINISHED_ABORTED
                assert request.output_token_ids == expected[: request.num_output_tokens]
            else:
                assert request.status is RequestStatus.FINISHED_LENGTH
                assert request.output_token_ids == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4]),
    pool_tokens=st.integers(12, 40),
    max_num_seqs=st.integers(1, 4),
    extra_budget=st.integers(0, 20),
    priority=st.booleans(),
    enable_prefix_caching=st.booleans(),
    script=events,
)
def test_random_traffic_keeps_every_invariant(
    block_size, pool_tokens, max_num_seqs, extra_budget, priority, enable_prefix_caching, script
) -> None:
    num_blocks = pool_tokens // block_size
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
    budget = max_num_seqs + extra_budget
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    policy = PriorityPolicy() if priority else FCFSPolicy()
    harness = Harness(Scheduler(config, kv, policy, MAX_MODEL_LEN))
    for event in script:
        if event[0] == "add":
            harness.add(*event[1:])
        elif event[0] == "abort":
            harness.abort(event[1])
        else:
            for _ in range(event[1]):
                harness.step()
    harness.finish()
