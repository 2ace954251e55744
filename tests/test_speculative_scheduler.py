"""Speculative tokens in the scheduler, with the fake model (no weights): proposals are
scheduled as 1 + k tokens, rejected ones rolled back and their slots overwritten; the tokens
equal an uninterrupted run's under preemption, chunked prefill and prefix caching; max_tokens,
stop tokens and max_model_len are never overshot; an abort mid-speculation leaks no block."""

from __future__ import annotations

import random

import pytest

from pagedserve.core.config import SchedulerConfig
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.scheduler import Scheduler, SchedulerOutput
from pagedserve.plugins.policies.scheduling import FCFSPolicy

from fake_model import FakeRunner, next_token, reference_tokens

BLOCK = 4
VOCAB = 50


class FakeSpecRunner(FakeRunner):
    """The fake model verifying proposals greedily: each position's token is computed from the
    context read back through the block table, proposals included."""

    def execute(self, output: SchedulerOutput) -> dict[str, list[int]]:
        for src, dst in output.blocks_to_copy:
            self.slots[dst] = list(self.slots[src])
        for entry in output.scheduled:
            request = entry.request
            tokens = request.all_token_ids + request.spec_token_ids[: entry.num_spec_tokens]
            start = request.num_computed_tokens
            assert len(request.block_ids) * self.size >= start + entry.num_new_tokens
            for pos in range(start, start + entry.num_new_tokens):
                self.block(request, pos)[pos % self.size] = tokens[pos]
        sampled = {}
        for entry in output.scheduled:
            if not entry.sample:
                continue
            request = entry.request
            drafts = request.spec_token_ids[: entry.num_spec_tokens]
            assert len(drafts) == entry.num_spec_tokens
            end = request.num_tokens + len(drafts)
            context = [self.block(request, p)[p % self.size] for p in range(end)]
            assert context == request.all_token_ids + drafts, f"{request.request_id} read wrong KV"
            tokens = []
            for j in range(len(drafts) + 1):
                token = next_token(context[: request.num_tokens + j], self.vocab)
                tokens.append(token)
                if j < len(drafts) and token != drafts[j]:
                    break
            sampled[request.request_id] = tokens
        return sampled


def propose(scheduler: Scheduler, rng: random.Random, k: int) -> None:
    """A proposer right for a random number of tokens, then wrong."""
    for request in scheduler.running:
        if request.num_computed_tokens != request.num_tokens - 1:
            continue
        truth = reference_tokens(request.all_token_ids, k, VOCAB)
        num_right = rng.randint(0, k)
        wrong = [(t + 1) % VOCAB for t in truth[num_right:]]
        request.set_spec_tokens(truth[:num_right] + wrong)


def run(scheduler: Scheduler, requests: list[Request], k: int, seed: int, abort_at: int | None = None):
    runner = FakeSpecRunner(scheduler.kv_cache, VOCAB)
    rng = random.Random(seed)
    for request in requests:
        scheduler.add_request(request)
    steps = 0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        assert output.total_num_scheduled_tokens <= scheduler.config.max_num_batched_tokens
        scheduler.update_from_output(output, runner.execute(output))
        propose(scheduler, rng, k)
        steps += 1
        if steps == abort_at:
            for request in list(scheduler.running):
                if request.spec_token_ids:
                    scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
        assert steps < 2000
    return steps


def make_scheduler(num_blocks: int, budget: int, lookahead: int = 0, max_model_len: int = 256) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=True)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    return Scheduler(config, kv, FCFSPolicy(), max_model_len, num_lookahead_tokens=lookahead)


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10, 11], [7] * 13, [3, 1, 4, 1, 5]]


@pytest.mark.parametrize(
    ("num_blocks", "budget", "lookahead"),
    [(200, 64, 0), (200, 64, 4), (18, 64, 4), (200, 6, 0), (18, 7, 4)],
    ids=["plenty", "lookahead", "preemption", "chunked", "both"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_tokens_match_plain_decoding(num_blocks, budget, lookahead, seed) -> None:
    scheduler = make_scheduler(num_blocks, budget, lookahead)
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=20 + i)) for i, p in enumerate(PROMPTS)]
    run(scheduler, requests, k=4, seed=seed)
    for request, prompt in zip(requests, PROMPTS):
        assert request.output_token_ids == reference_tokens(prompt, request.max_tokens, VOCAB)
        assert request.num_spec_drafts > 0
    assert sum(r.num_spec_accepted_tokens for r in requests) > 0
    assert scheduler.kv_cache.num_used_blocks == 0
    if num_blocks == 18 and budget == 64:
        assert scheduler.num_preemptions_total > 0


def test_k_is_cut_by_budget_max_tokens_and_model_len() -> None:
    scheduler = make_scheduler(200, budget=3, max_model_len=16)
    long = Request("long", list(range(1, 12)), SamplingParams(max_tokens=100))
    short = Request("short", [5, 6], SamplingParams(max_tokens=3))
    for request in (long, short):
        scheduler.add_request(request)
    runner = FakeSpecRunner(scheduler.kv_cache, VOCAB)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        for entry in output.scheduled:
            request = entry.request
            if entry.num_spec_tokens:
                assert entry.num_new_tokens == 1 + entry.num_spec_tokens <= 3
                assert request.num_tokens + entry.num_spec_tokens + 1 <= 16
                assert request.num_output_tokens + entry.num_spec_tokens + 1 <= request.max_tokens
        scheduler.update_from_output(output, runner.execute(output))
        for request in scheduler.running:  # always right: every proposal is accepted
            if request.num_computed_tokens == request.num_tokens - 1:
                request.set_spec_tokens(reference_tokens(request.all_token_ids, 8, VOCAB))
    assert long.num_tokens == 16 and long.status is RequestStatus.FINISHED_LENGTH
    assert short.num_output_tokens == 3
    assert long.num_spec_accepted_tokens == long.num_spec_draft_tokens > 0


def test_stop_token_inside_accepted_tokens_ends_there() -> None:
    prompt = [4, 8, 15, 16]
    truth = reference_tokens(prompt, 12, VOCAB)
    stop_at = 5
    stop = truth[stop_at]
    assert stop not in truth[:stop_at]
    scheduler = make_scheduler(200, budget=64)
    request = Request("r", prompt, SamplingParams(max_tokens=12, stop_token_ids=[stop]))
    scheduler.add_request(request)
    runner = FakeSpecRunner(scheduler.kv_cache, VOCAB)
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        scheduler.update_from_output(output, runner.execute(output))
        if request.status is RequestStatus.RUNNING:
            request.set_spec_tokens(reference_tokens(request.all_token_ids, 8, VOCAB))
    assert request.output_token_ids == truth[: stop_at + 1]
    assert request.stop_reason == stop
    assert scheduler.kv_cache.num_used_blocks == 0


def test_abort_mid_speculation_leaks_no_block() -> None:
    scheduler = make_scheduler(60, budget=32, lookahead=4)
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=30)) for i, p in enumerate(PROMPTS)]
    run(scheduler, requests, k=4, seed=3, abort_at=4)
    assert any(r.status is RequestStatus.FINISHED_ABORTED for r in requests)
    assert scheduler.kv_cache.num_used_blocks == 0
    assert scheduler.kv_cache.num_free_blocks == 60


def test_accepted_tokens_fill_prefix_cache_blocks() -> None:
    """A block filled by accepted proposals is cached after the step, so an identical request
    later takes it from the cache."""
    prompt = [9, 9, 2, 5, 1]
    scheduler = make_scheduler(200, budget=64)
    first = Request("a", prompt, SamplingParams(max_tokens=16))
    run(scheduler, [first], k=4, seed=5)
    second = Request("b", first.all_token_ids[:-1], SamplingParams(max_tokens=1))
    scheduler.add_request(second)
    scheduler.schedule()
    assert second.num_cached_tokens == (second.num_tokens - 1) // BLOCK * BLOCK
