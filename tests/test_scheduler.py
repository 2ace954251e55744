"""Scheduler tests with a fake model runner and no model.

The fake runner keeps the token written in every KV slot and computes each sampled token from
what it reads back through the request's block ids, as a real model does from its KV cache: a
wrong block table, a missing copy-on-write or a bad prefix hit changes the generated tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fake_model import FakeRunner, reference_tokens
from scheduler_helpers import (
    VOCAB,
    make_group,
    make_request,
    make_scheduler,
    prompt,
    run_all,
    step,
)

from pagedserve.core.config import SchedulerConfig
from pagedserve.core.plugins import PluginManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.plugins import policies as builtin_policies
from pagedserve.plugins.policies.eviction import LRUEvictionPolicy
from pagedserve.plugins.policies.hashing import builtin_block_hash, sha256_block_hash
from pagedserve.plugins.policies.scheduling import FCFSPolicy, PriorityPolicy

# -- budgets and order ------------------------------------------------------------------------


def test_chunked_prefill_under_the_token_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=16)
    request = make_request("a", prompt(1, 40), max_tokens=3)
    outputs = run_all(scheduler, [request])
    chunks = [(o.scheduled[0].num_new_tokens, o.scheduled[0].sample) for o in outputs]
    assert chunks == [(16, False), (16, False), (8, True), (1, True), (1, True)]
    assert request.output_token_ids == reference_tokens(prompt(1, 40), 3, VOCAB)
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_running_requests_come_before_waiting_ones() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=10)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    decoding = make_request("a", prompt(1, 5), max_tokens=20)
    scheduler.add_request(decoding)
    step(scheduler, runner)
    scheduler.add_request(make_request("b", prompt(2, 30)))
    output = step(scheduler, runner)
    assert [(s.request.request_id, s.num_new_tokens) for s in output.scheduled] == [("a", 1), ("b", 9)]
    assert output.scheduled[1].sample is False


def test_max_num_seqs_limits_each_step() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    requests = [make_request(f"r{i}", prompt(i, 6), max_tokens=4, arrival_time=i) for i in range(5)]
    outputs = run_all(scheduler, requests)
    assert max(len(o.scheduled) for o in outputs) == 2
    for i, request in enumerate(requests):
        assert request.output_token_ids == reference_tokens(prompt(i, 6), 4, VOCAB)


def finish_order(scheduler: Scheduler, requests: list[Request]) -> list[str]:
    finished = []
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    for request in requests:
        scheduler.add_request(request)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        for request in scheduler.update_from_output(output, runner.execute(output)):
            if request.is_finished:
                finished.append(request.request_id)
    return finished


def test_fcfs_serves_by_arrival_time() -> None:
    scheduler = make_scheduler(max_num_seqs=1)
    requests = [make_request(name, prompt(i, 5), 2, arrival_time=t) for i, (name, t) in enumerate(
        [("late", 3.0), ("first", 1.0), ("second", 2.0)]
    )]
    assert finish_order(scheduler, requests) == ["first", "second", "late"]


def test_priority_serves_the_lowest_value_first_then_by_arrival() -> None:
    scheduler = make_scheduler(max_num_seqs=1, policy=PriorityPolicy())
    specs = [("low", 5, 1.0), ("high-late", 0, 3.0), ("high-early", 0, 2.0), ("mid", 2, 0.5)]
    requests = [
        make_request(name, prompt(i, 5), 2, priority=prio, arrival_time=t)
        for i, (name, prio, t) in enumerate(specs)
    ]
    assert finish_order(scheduler, requests) == ["high-early", "high-late", "mid", "low"]


def test_policies_pick_their_victims() -> None:
    early = make_request("early", [1], priority=0, arrival_time=1.0)
    late = make_request("late", [1], priority=0, arrival_time=2.0)
    unimportant = make_request("unimportant", [1], priority=9, arrival_time=0.0)
    assert FCFSPolicy().pick_victim([early, late, unimportant]) is unimportant
    assert PriorityPolicy().pick_victim([early, unimportant, late]) is unimportant
    assert PriorityPolicy().pick_victim([late, early]) is late


def test_builtin_policies_register_lazily() -> None:
    code = (
        "import json, sys\n"
        "from pagedserve.core.plugins import PluginManager\n"
        "import pagedserve.plugins.policies as plugin\n"
        "manager = PluginManager(allow=[])\n"
        "manager.register_plugin(plugin, 'core_policies')\n"
        "kinds = ('scheduling_policies', 'eviction_policies', 'prefix_hash_functions')\n"
        "names = {kind: manager.registry(kind).names() for kind in kinds}\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith(plugin.__name__ + '.')]\n"
        "print(json.dumps([names, loaded]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, loaded = json.loads(result.stdout)
    assert names == {
        "scheduling_policies": ["fcfs", "priority"],
        "eviction_policies": ["lru"],
        "prefix_hash_functions": ["builtin", "sha256"],
    }
    assert loaded == []  # registering imported neither torch nor the implementations

    manager = PluginManager(allow=[])
    manager.register_plugin(builtin_policies, "core_policies")
    scheduling = manager.registry("scheduling_policies")
    hashing = manager.registry("prefix_hash_functions")
    assert scheduling.load("fcfs") is FCFSPolicy and scheduling.load("priority") is PriorityPolicy
    assert manager.registry("eviction_policies").load("lru") is LRUEvictionPolicy
    assert hashing.load("sha256") is sha256_block_hash
    assert hashing.load("builtin") is builtin_block_hash


# -- preemption -------------------------------------------------------------------------------


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_preemption_recomputes_to_the_same_tokens(enable_prefix_caching: bool) -> None:
    def generate(num_blocks: int) -> tuple[list[list[int]], int]:
        scheduler = make_scheduler(num_blocks=num_blocks, enable_prefix_caching=enable_prefix_caching)
        requests = [make_request(f"r{i}", prompt(i, 10), max_tokens=20, arrival_time=i) for i in range(4)]
        run_all(scheduler, requests)
        assert all(r.status is RequestStatus.FINISHED_LENGTH for r in requests)
        return [r.output_token_ids for r in requests], scheduler.num_preemptions_total

    big, big_preemptions = generate(64)
    small, small_preemptions = generate(12)  # each request needs 8 of the 12 blocks at the end
    assert big_preemptions == 0 and small_preemptions > 0
    assert small == big == [reference_tokens(prompt(i, 10), 20, VOCAB) for i in range(4)]


def test_a_victim_scheduled_earlier_in_the_step_is_unscheduled_and_refunded() -> None:
    scheduler = make_scheduler(num_blocks=4, max_num_batched_tokens=16, policy=PriorityPolicy())
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    low = make_request("low", prompt(1, 5), max_tokens=8, priority=5, arrival_time=0.0)
    high = make_request("high", prompt(2, 8), max_tokens=8, priority=0, arrival_time=1.0)
    scheduler.add_request(low)
    step(scheduler, runner)
    scheduler.add_request(high)
    step(scheduler, runner)
    # Both decode; low comes first in the running list and fits in its second block. high
    # needs a third block and none is free: the victim is low, already scheduled this step.
    output = scheduler.schedule()
    assert output.preempted == [low]
    assert [(s.request.request_id, s.num_new_tokens) for s in output.scheduled] == [("high", 1)]
    assert output.total_num_scheduled_tokens == 1
    assert low.status is RequestStatus.PREEMPTED and low.block_ids == [] and low.num_computed_tokens == 0
    assert low.num_preemptions == 1 and scheduler.num_waiting == 1
    scheduler.update_from_output(output, runner.execute(output))
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert low.output_token_ids == reference_tokens(prompt(1, 5), 8, VOCAB)
    assert high.output_token_ids == reference_tokens(prompt(2, 8), 8, VOCAB)


def test_no_admission_in_a_step_that_preempted() -> None:
    scheduler = make_scheduler(num_blocks=4)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    a = make_request("a", prompt(1, 7), max_tokens=8, arrival_time=0.0)
    b = make_request("b", prompt(2, 7), max_tokens=8, arrival_time=1.0)
    scheduler.add_request(a)
    scheduler.add_request(b)
    while not scheduler.num_preemptions_total:
        output = step(scheduler, runner)
    assert output.preempted == [b]
    assert [s.request for s in output.scheduled] == [a]


# -- prefix caching ---------------------------------------------------------------------------


def test_prefix_hits_skip_cached_tokens() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    first = make_request("a", prompt(1, 10), max_tokens=2)
    run_all(scheduler, [first], runner)
    second = make_request("b", prompt(1, 10), max_tokens=2)
    outputs = run_all(scheduler, [second], runner)
    assert outputs[0].scheduled[0].num_new_tokens == 2  # 8 of the 10 prompt tokens were cached
    assert second.num_cached_tokens == 8
    assert second.output_token_ids == first.output_token_ids
    assert (scheduler.prefix_cache_queries, scheduler.prefix_cache_hits) == (20, 8)


# -- aborts -----------------------------------------------------------------------------------


def abort(scheduler: Scheduler, request: Request) -> None:
    assert scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED) is request
    assert request.status is RequestStatus.FINISHED_ABORTED and request.block_ids == []
    assert scheduler.get_request(request.request_id) is None


@pytest.mark.parametrize("steps_before_abort", [0, 1, 2, 4])
def test_abort_at_each_stage_frees_every_block(steps_before_abort: int) -> None:
    # 0: waiting, 1: mid chunked prefill, 2: prefill done, 4: decoding
    scheduler = make_scheduler(max_num_batched_tokens=8)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    request = make_request("a", prompt(1, 14), max_tokens=10)
    scheduler.add_request(request)
    for _ in range(steps_before_abort):
        step(scheduler, runner)
    abort(scheduler, request)
    assert scheduler.kv_cache.num_used_blocks == 0 and not scheduler.has_unfinished_requests()
    assert scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert scheduler.finish_request("unknown", RequestStatus.FINISHED_ABORTED) is None


def test_abort_of_a_preempted_request() -> None:
    scheduler = make_scheduler(num_blocks=4)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    a = make_request("a", prompt(1, 7), arrival_time=0.0)
    b = make_request("b", prompt(2, 7), arrival_time=1.0)
    scheduler.add_request(a)
    scheduler.add_request(b)
    while not scheduler.num_preemptions_total:
        step(scheduler, runner)
    assert b.status is RequestStatus.PREEMPTED
    abort(scheduler, b)
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert scheduler.kv_cache.num_used_blocks == 0
    assert a.output_token_ids == reference_tokens(prompt(1, 7), 8, VOCAB)


def test_finish_request_with_a_stop_string_reason() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    request = make_request("a", prompt(1, 5))
    scheduler.add_request(request)
    step(scheduler, runner)
    assert scheduler.finish_request("a", RequestStatus.FINISHED_STOPPED, "###") is request
    assert (request.finish_reason, request.stop_reason) == ("stop", "###")
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_request("a", RequestStatus.RUNNING)


# -- rejection --------------------------------------------------------------------------------


def test_requests_that_can_never_run_are_rejected() -> None:
    scheduler = make_scheduler(num_blocks=4, max_num_seqs=2, max_model_len=64)
    with pytest.raises(ValueError, match="KV blocks"):
        scheduler.add_request(make_request("long", prompt(1, 10), max_tokens=7))  # 17 tokens
    scheduler.add_request(make_request("fits", prompt(1, 10), max_tokens=6))  # 16 tokens
    with pytest.raises(ValueError, match="max_num_seqs"):
        scheduler.add_request(make_group("group", prompt(1, 3), n=3, max_tokens=2))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(make_request("huge", prompt(1, 65), max_tokens=1))
    with pytest.raises(ValueError, match="empty prompt"):
        scheduler.add_request(make_request("empty", [], max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("fits", prompt(1, 3), max_tokens=1))
    assert scheduler.num_waiting == 1


def test_max_model_len_bounds_the_never_fits_check() -> None:
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    request = make_request("a", prompt(1, 10), max_tokens=None)
    run_all(scheduler, [request])
    assert request.status is RequestStatus.FINISHED_LENGTH and request.num_tokens == 16


# -- n > 1 ------------------------------------------------------------------------------------


def test_siblings_fork_the_prompt_blocks_and_copy_on_write() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    leader = make_group("g", prompt(1, 10), n=3, max_tokens=5)
    siblings = list(leader.fork_children)
    scheduler.add_request(leader)
    assert scheduler.get_request("g-2") is siblings[1] and scheduler.num_waiting == 3

    first = step(scheduler, runner)
    scheduled = [(s.request.request_id, s.num_new_tokens, s.sample) for s in first.scheduled]
    assert scheduled == [("g-0", 9, False)]
    assert leader.fork_children == []
    for sibling in siblings:  # forked as soon as the leader reached its fork point
        assert sibling.status is RequestStatus.RUNNING and sibling.num_computed_tokens == 9
        assert sibling.block_ids == leader.block_ids
    assert all(scheduler.kv_cache.pool.ref_counts[b] == 3 for b in leader.block_ids)

    second = step(scheduler, runner)
    assert [(s.request.request_id, s.num_new_tokens) for s in second.scheduled] == [
        ("g-0", 1), ("g-1", 1), ("g-2", 1)
    ]
    # The third block holds one prompt token and is shared: two writers copy it, the last
    # writes in place.
    shared = siblings[1].block_ids[2]
    assert [src for src, _ in second.blocks_to_copy] == [shared, shared]
    assert leader.block_ids[:2] == siblings[0].block_ids[:2] == siblings[1].block_ids[:2]

    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    expected = reference_tokens(prompt(1, 10), 5, VOCAB)
    for member in (leader, *siblings):
        assert member.status is RequestStatus.FINISHED_LENGTH
        assert member.output_token_ids == expected
    assert scheduler.kv_cache.num_used_blocks == 0


def test_fork_at_admission_after_a_prefix_hit() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    run_all(scheduler, [make_request("warm", prompt(1, 9), max_tokens=1)], runner)
    leader = make_group("g", prompt(1, 9), n=2, max_tokens=3)
    sibling = leader.fork_children[0]
    outputs = run_all(scheduler, [leader], runner)
    first = outputs[0]
    assert [(s.request.request_id, s.num_new_tokens, s.sample) for s in first.scheduled] == [
        ("g-0", 1, True), ("g-1", 1, True)
    ]
    assert leader.num_cached_tokens == sibling.num_cached_tokens == 8
    assert leader.output_token_ids == sibling.output_token_ids == reference_tokens(prompt(1, 9), 3, VOCAB)


def test_one_token_prompt_with_n_siblings() -> None:
    scheduler = make_scheduler()
    leader = make_group("g", [7], n=3, max_tokens=2)
    siblings = list(leader.fork_children)
    outputs = run_all(scheduler, [leader])
    assert len(outputs[0].scheduled) == 3
    for member in (leader, *siblings):
        assert member.output_token_ids == reference_tokens([7], 2, VOCAB)


def test_aborting_a_leader_before_the_fork_aborts_its_siblings() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    leader = make_group("g", prompt(1, 10), n=3)
    siblings = list(leader.fork_children)
    scheduler.add_request(leader)
    step(scheduler, runner)  # mid prefill: the siblings still wait
    abort(scheduler, leader)
    assert leader.fork_children == siblings
    assert all(s.status is RequestStatus.FINISHED_ABORTED for s in siblings)
    assert scheduler.get_request("g-1") is None and not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache.num_used_blocks == 0


def test_aborting_a_waiting_sibling_keeps_the_others() -> None:
    scheduler = make_scheduler()
    leader = make_group("g", prompt(1, 10), n=3, max_tokens=2)
    first, second = leader.fork_children
    scheduler.add_request(leader)
    abort(scheduler, first)
    assert leader.fork_children == [second]
    run_all(scheduler, [])
    assert second.output_token_ids == leader.output_token_ids == reference_tokens(prompt(1, 10), 2, VOCAB)


def test_a_group_waits_for_seats_for_all_its_members() -> None:
    scheduler = make_scheduler(max_num_seqs=3)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    scheduler.add_request(make_request("solo", prompt(1, 4), max_tokens=3, arrival_time=0.0))
    step(scheduler, runner)
    leader = make_group("g", prompt(2, 6), n=3, max_tokens=2)
    scheduler.add_request(leader)
    output = step(scheduler, runner)
    assert [s.request.request_id for s in output.scheduled] == ["solo"]
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
        assert scheduler.num_running <= 3
    assert leader.output_token_ids == reference_tokens(prompt(2, 6), 2, VOCAB)


# -- stop conditions --------------------------------------------------------------------------


def drive(request: Request, tokens: list[int], max_model_len: int = 256) -> list[int]:
    """Feed ``tokens`` as the model's samples until the request finishes."""
    scheduler = make_scheduler(max_model_len=max_model_len)
    scheduler.add_request(request)
    feed = iter(tokens)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        samples = {s.request.request_id: next(feed) for s in output.scheduled if s.sample}
        scheduler.update_from_output(output, samples)
    assert scheduler.kv_cache.num_used_blocks == 0
    return request.output_token_ids


def test_eos_stops() -> None:
    request = make_request("a", [1, 2], max_tokens=10, eos_token_ids=(0,))
    assert drive(request, [5, 0, 6]) == [5, 0]
    assert (request.status, request.stop_reason) == (RequestStatus.FINISHED_STOPPED, None)


def test_ignore_eos_runs_to_max_tokens() -> None:
    request = make_request("a", [1, 2], max_tokens=3, eos_token_ids=(0,), ignore_eos=True)
    assert drive(request, [0, 0, 0, 0]) == [0, 0, 0]
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_min_tokens_defers_eos_and_stop_tokens() -> None:
    request = make_request("a", [1], max_tokens=10, min_tokens=3, eos_token_ids=(0,), stop_token_ids=[9])
    assert drive(request, [0, 9, 0, 4]) == [0, 9, 0]
    assert request.status is RequestStatus.FINISHED_STOPPED


def test_stop_token_sets_the_stop_reason() -> None:
    request = make_request("a", [1], max_tokens=10, stop_token_ids=[9, 8])
    assert drive(request, [3, 8]) == [3, 8]
    assert (request.status, request.stop_reason) == (RequestStatus.FINISHED_STOPPED, 8)


def test_eos_on_the_last_allowed_token_is_a_stop() -> None:
    request = make_request("a", [1], max_tokens=2, eos_token_ids=(0,))
    assert drive(request, [3, 0]) == [3, 0]
    assert request.status is RequestStatus.FINISHED_STOPPED


def test_max_model_len_ends_the_request() -> None:
    request = make_request("a", [1, 2, 3], max_tokens=None)
    assert drive(request, [4] * 10, max_model_len=6) == [4, 4, 4]
    assert request.status is RequestStatus.FINISHED_LENGTH


def test_a_missing_sample_is_an_error() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [1, 2]))
    with pytest.raises(ValueError, match="no sampled token"):
        scheduler.update_from_output(scheduler.schedule(), {})


def test_first_scheduled_time_and_unset_budget() -> None:
    scheduler = make_scheduler()
    request = make_request("a", [1, 2])
    scheduler.add_request(request)
    assert request.first_scheduled_time is None
    scheduler.schedule()
    assert request.first_scheduled_time is not None
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(SchedulerConfig(), scheduler.kv_cache, FCFSPolicy(), 64)
