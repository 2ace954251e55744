"""Admission when the server is full or a request is not ready: fair seats (no request's
sequences keep a newcomer waiting beyond a bounded number of steps) and requests waiting for
their preparation (a grammar compiling) while the others run. Same fake runner as
test_scheduler.py."""

from __future__ import annotations

from concurrent.futures import Future

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

from pagedserve.core.request import Request, RequestStatus

# -- fair seats -------------------------------------------------------------------------------


def test_one_request_with_every_seat_cannot_keep_newcomers_waiting() -> None:
    """An n=256 request holds all 256 seats; small requests arriving every third step each get
    their first token within two steps of arriving (steps, not seconds), and every sequence of
    the big one, preempted to make room, still generates the uninterrupted tokens."""
    scheduler = make_scheduler(num_blocks=6000, max_num_seqs=256, max_num_batched_tokens=512)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    big = make_group("big", prompt(1, 6), n=256, max_tokens=40)
    members = [big, *big.fork_children]
    scheduler.add_request(big)
    small: dict[str, tuple[Request, int]] = {}
    waited: dict[str, int] = {}
    steps = 0
    while steps < 90 or scheduler.has_unfinished_requests():
        assert steps < 400, "the scheduler made no progress"
        if steps % 3 == 0 and steps < 90:
            request = make_request(f"s{steps}", prompt(steps + 2, 5), max_tokens=3)
            scheduler.add_request(request)
            small[request.request_id] = (request, steps)
        step(scheduler, runner)
        steps += 1
        for request_id, (request, arrived) in small.items():
            if request.output_token_ids and request_id not in waited:
                waited[request_id] = steps - arrived
    assert len(waited) == len(small) == 30
    assert max(waited.values()) <= 2, waited
    for request, _ in small.values():
        assert request.output_token_ids == reference_tokens(request.prompt_token_ids, 3, VOCAB)
    expected = reference_tokens(prompt(1, 6), 40, VOCAB)
    assert all(member.output_token_ids == expected for member in members)
    assert scheduler.num_preemptions_total > 0
    assert scheduler.kv_cache.num_used_blocks == 0


def test_fair_seats_leave_one_sequence_per_request() -> None:
    """Two requests of four sequences fill eight seats; a newcomer of n=8 cannot get in even by
    taking all but one from each, so no one is preempted; one of n=3 takes three seats (two
    from the request holding the most, then one from the other)."""
    scheduler = make_scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    for name in ("a", "b"):
        scheduler.add_request(make_group(name, prompt(len(name), 5), n=4, max_tokens=30))
    for _ in range(3):
        step(scheduler, runner)
    assert scheduler.num_running == 8
    scheduler.add_request(make_group("wide", prompt(3, 5), n=8, max_tokens=2))
    output = step(scheduler, runner)
    assert output.preempted == [] and scheduler.num_running == 8
    scheduler.finish_request("wide-0", RequestStatus.FINISHED_ABORTED)
    scheduler.add_request(make_group("c", prompt(4, 5), n=3, max_tokens=2))
    output = step(scheduler, runner)
    assert sorted(r.parent_id for r in output.preempted) in (["a", "a", "b"], ["a", "b", "b"])
    assert {s.request.parent_id for s in output.scheduled} == {"a", "b", "c"}
    run_all(scheduler, [], runner)

# -- requests waiting for their preparation (a grammar compiling) ---------------------------------


def test_a_request_waits_for_its_pending_work_while_the_others_run() -> None:
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    compiling: Future = Future()
    first = make_request("first", prompt(1, 6), max_tokens=4, arrival_time=0)
    first.pending = [compiling]
    later = make_request("later", prompt(2, 6), max_tokens=4, arrival_time=1)
    scheduler.add_request(first)
    scheduler.add_request(later)
    for _ in range(2):
        output = step(scheduler, runner)
        assert [s.request.request_id for s in output.scheduled] == ["later"]
        assert first.status is RequestStatus.WAITING and first.num_computed_tokens == 0
    scheduler.wait_for_pending(0.0)  # returns at once: nothing to wait for that long
    compiling.set_result(None)
    output = step(scheduler, runner)
    assert [s.request.request_id for s in output.scheduled] == ["later", "first"]
    while scheduler.has_unfinished_requests():
        step(scheduler, runner)
    assert first.output_token_ids == reference_tokens(prompt(1, 6), 4, VOCAB)
    assert scheduler.kv_cache.num_used_blocks == 0


def test_aborting_a_request_that_waits_for_pending_work() -> None:
    scheduler = make_scheduler()
    request = make_request("a", prompt(1, 6))
    request.pending = [Future()]
    scheduler.add_request(request)
    assert scheduler.schedule().scheduled == []
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.has_unfinished_requests()
