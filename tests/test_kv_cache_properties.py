"""A hypothesis state machine over the KV-cache manager.

The machine plays the model runner too: it keeps the content of every block (the token written
in each slot), applies the copy-on-write copies before writing, and checks that every request
reads back exactly its own tokens through its block ids, prefix hits and forks included.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.core.sampling_params import SamplingParams

NUM_BLOCKS = 12
BLOCK = 4
#: Prompts are drawn from a few shared prefixes so that prefix hits happen often.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7] * 12]

prompts = st.builds(
    lambda prefix, tail: prefix + tail,
    st.sampled_from(PREFIXES),
    st.lists(st.integers(0, 3), max_size=6),
)


class KVCacheMachine(RuleBasedStateMachine):
    requests = Bundle("requests")

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK)
        self.live: dict[str, Request] = {}
        self.content: list[list[int | None]] = [[None] * BLOCK for _ in range(NUM_BLOCKS)]
        self.ids = itertools.count()

    # -- the runner's side ------------------------------------------------------------------

    def _run(self, request: Request, num_new: int) -> None:
        """Apply the pending copies, then write the request's new tokens into its blocks."""
        for src, dst in self.kv.take_copies():
            assert src != dst and self.kv.pool.ref_counts[dst] >= 1
            self.content[dst] = list(self.content[src])
        start = request.num_computed_tokens
        for pos in range(start, start + num_new):
            block = request.block_ids[pos // BLOCK]
            self.content[block][pos % BLOCK] = request.all_token_ids[pos]
        request.num_computed_tokens += num_new

    def _snapshot(self) -> tuple:
        pool = self.kv.pool
        kv = self.kv
        return (list(pool.ref_counts), dict(pool.cached), kv.num_free_blocks, kv.num_cached_blocks)

    def _allocate(self, request: Request, num_new: int, hits=(), num_hit: int = 0) -> bool:
        before = self._snapshot()
        blocks_before = list(request.block_ids)
        if not self.kv.allocate_slots(request, num_new, hits, num_hit):
            assert self._snapshot() == before and request.block_ids == blocks_before
            return False
        assert len(request.block_ids) * BLOCK >= request.num_computed_tokens + num_hit + num_new
        return True

    # -- rules ----------------------------------------------------------------------------------

    @rule(target=requests, prompt=prompts, salt=st.sampled_from([None, "x"]), data=st.data())
    def admit(self, prompt: list[int], salt, data) -> Request:
        request = Request(f"r{next(self.ids)}", prompt, SamplingParams(), cache_salt=salt)
        hits, num_hit = self.kv.get_computed_blocks(request)
        assert num_hit < request.num_tokens and num_hit == len(hits) * BLOCK
        num_new = data.draw(st.integers(1, request.num_tokens - num_hit), label="num_new")
        if self._allocate(request, num_new, hits, num_hit):
            request.num_computed_tokens = num_hit
            self._run(request, num_new)
            self.live[request.request_id] = request
        return request

    @rule(request=requests, token=st.integers(0, 3), data=st.data())
    def grow(self, request: Request, token: int, data) -> None:
        if request.request_id not in self.live:
            return
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(token)
        remaining = request.num_tokens - request.num_computed_tokens
        num_new = data.draw(st.integers(1, remaining), label="num_new")
        if self._allocate(request, num_new):
            self._run(request, num_new)

    @rule(target=requests, parent=requests)
    def fork(self, parent: Request) -> Request:
        if parent.request_id not in self.live:
            return parent
        child = Request(f"r{next(self.ids)}", parent.prompt_token_ids, SamplingParams())
        for token in parent.output_token_ids:
            child.append_output_token(token)
        self.kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        self.live[child.request_id] = child
        return child

    @rule(
        target=requests,
        parent=requests,
        tokens=st.lists(st.integers(0, 3), min_size=2, max_size=2, unique=True),
    )
    def fork_and_sample_both(self, parent: Request, tokens: list[int]) -> Request:
        """Parallel sampling: both sides append a different token and compute it."""
        child = self.fork(parent)
        if child is parent or parent.num_computed_tokens < parent.num_tokens:
            return child
        for request, token in zip((parent, child), tokens):
            request.append_output_token(token)
            if self._allocate(request, 1):
                self._run(request, 1)
            else:  # no room: drop it, as a preemption would
                del self.live[request.request_id]
                self.kv.free(request)
        return child

    @rule(request=requests, token=st.integers(0, 3))
    def preempted_after_allocating(self, request: Request, token: int) -> None:
        """A running request is allocated a step (maybe copy-on-write) and preempted before it
        runs: no pending copy may target a block it freed."""
        if request.request_id not in self.live:
            return
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(token)
        self._allocate(request, 1)
        del self.live[request.request_id]
        self.kv.free(request)
        for src, dst in self.kv.take_copies():
            assert self.kv.pool.ref_counts[dst] >= 1

    @rule(request=consumes(requests))
    def free(self, request: Request) -> None:
        if self.live.pop(request.request_id, None) is not None:
            self.kv.free(request)

    @rule(prompt=prompts)
    def preempted_before_running(self, prompt: list[int]) -> None:
        """Allocated and freed in the same step: nothing it was to compute may be reused."""
        request = Request(f"r{next(self.ids)}", prompt, SamplingParams())
        hits, num_hit = self.kv.get_computed_blocks(request)
        if self._allocate(request, request.num_tokens - num_hit, hits, num_hit):
            request.num_computed_tokens = num_hit
            self.kv.free(request)

    @precondition(lambda self: self.live)
    @rule()
    def free_everything(self) -> None:
        for request in self.live.values():
            self.kv.free(request)
        self.live.clear()
        assert self.kv.num_free_blocks == NUM_BLOCKS and self.kv.num_used_blocks == 0

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def ref_counts_equal_owners(self) -> None:
        owners = [0] * NUM_BLOCKS
        for request in self.live.values():
            assert len(set(request.block_ids)) == len(request.block_ids)
            assert len(request.block_ids) == self.kv.blocks_needed(request.num_computed_tokens)
            for block in request.block_ids:
                owners[block] += 1
        pool = self.kv.pool
        assert pool.ref_counts == owners
        for block in range(NUM_BLOCKS):
            assert (block in pool.free_blocks) == (owners[block] == 0)

    @invariant()
    def counts_add_up(self) -> None:
        pool = self.kv.pool
        assert self.kv.num_free_blocks + self.kv.num_used_blocks == NUM_BLOCKS
        assert self.kv.num_free_blocks == pool.ref_counts.count(0)
        free_cached = sum(
            1
            for block in range(NUM_BLOCKS)
            if pool.ref_counts[block] == 0 and pool.block_hashes[block] is not None
        )
        assert self.kv.num_cached_blocks == free_cached
        assert 0.0 <= self.kv.usage <= 1.0

    @invariant()
    def every_request_reads_back_its_tokens(self) -> None:
        for request in self.live.values():
            read = [
                self.content[request.block_ids[pos // BLOCK]][pos % BLOCK]
                for pos in range(request.num_computed_tokens)
            ]
            assert read == request.all_token_ids[: request.num_computed_tokens], request

    @invariant()
    def cached_blocks_hold_their_content(self) -> None:
        pool = self.kv.pool
        for block_hash, block in pool.cached.items():
            assert pool.block_hashes[block] == block_hash
            assert None not in self.content[block]

    def teardown(self) -> None:
        for request in self.live.values():
            self.kv.free(request)
        assert self.kv.num_free_blocks == NUM_BLOCKS
        assert all(count == 0 for count in self.kv.pool.ref_counts)


KVCacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestKVCacheMachine = KVCacheMachine.TestCase
