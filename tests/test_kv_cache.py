"""Unit tests of the KV-cache manager, the LRU eviction policy and the prefix hash functions."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.plugins.policies.eviction import LRUEvictionPolicy
from pagedserve.plugins.policies.hashing import builtin_block_hash, sha256_block_hash

BLOCK = 4


def make_request(request_id: str, tokens: list[int], **kwargs) -> Request:
    params = SamplingParams(prompt_logprobs=kwargs.pop("prompt_logprobs", None))
    return Request(request_id, tokens, params, **kwargs)


def compute(kv: KVCacheManager, request: Request, num_tokens: int | None = None) -> None:
    """Admit ``request`` with its prefix hits and compute ``num_tokens`` more (default: all)."""
    hits, num_hit = kv.get_computed_blocks(request)
    if num_tokens is None:
        num_tokens = request.num_tokens - num_hit
    assert kv.allocate_slots(request, num_tokens, hits, num_hit)
    request.num_computed_tokens = num_hit + num_tokens


def test_blocks_needed_rounds_up() -> None:
    kv = KVCacheManager(8, BLOCK)
    assert [kv.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocation_accounting_and_free() -> None:
    kv = KVCacheManager(10, BLOCK)
    request = make_request("a", list(range(10)))
    compute(kv, request)
    assert len(request.block_ids) == 3 and len(set(request.block_ids)) == 3
    assert (kv.num_used_blocks, kv.num_free_blocks, kv.usage) == (3, 7, 0.3)
    kv.free(request)
    assert request.block_ids == []
    assert (kv.num_used_blocks, kv.num_free_blocks) == (0, 10)
    assert kv.num_cached_blocks == 2  # the two full blocks; the partial third is not cached


def test_prefix_hit_reuses_the_freed_blocks() -> None:
    kv = KVCacheManager(10, BLOCK)
    first = make_request("a", list(range(10)))
    compute(kv, first)
    full_blocks = first.block_ids[:2]
    kv.free(first)

    second = make_request("b", list(range(10)) + [99])
    hits, num_hit = kv.get_computed_blocks(second)
    assert hits == full_blocks and num_hit == 8
    assert kv.allocate_slots(second, second.num_tokens - num_hit, hits, num_hit)
    assert second.block_ids[:2] == full_blocks
    assert kv.num_cached_blocks == 0 and kv.num_used_blocks == 3
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 11, 8)


def test_prefix_hit_while_the_owner_still_runs_shares_the_block() -> None:
    kv = KVCacheManager(10, BLOCK)
    owner = make_request("a", list(range(9)))
    compute(kv, owner)
    reader = make_request("b", list(range(9)))
    compute(kv, reader)
    assert reader.block_ids[:2] == owner.block_ids[:2]
    assert [kv.pool.ref_counts[b] for b in owner.block_ids] == [2, 2, 1]
    assert reader.block_ids[2] != owner.block_ids[2]


def test_hits_never_cover_the_last_token() -> None:
    kv = KVCacheManager(10, BLOCK)
    first = make_request("a", list(range(8)))
    compute(kv, first)
    kv.free(first)
    again = make_request("b", list(range(8)))
    hits, num_hit = kv.get_computed_blocks(again)
    assert num_hit == 4 and len(hits) == 1


def test_hash_chain_misses_after_a_different_block() -> None:
    kv = KVCacheManager(10, BLOCK)
    first = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, first)
    kv.free(first)
    # Same second block, different first block: the chain makes the second block miss too.
    other = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(other) == ([], 0)


@pytest.mark.parametrize("salt", ["tenant-b", 7, ("lora", 1)])
def test_cache_salt_separates_prefixes(salt) -> None:
    kv = KVCacheManager(10, BLOCK)
    first = make_request("a", list(range(9)), cache_salt="tenant-a")
    compute(kv, first)
    kv.free(first)
    assert kv.get_computed_blocks(make_request("b", list(range(9)), cache_salt=salt)) == ([], 0)
    hits, num_hit = kv.get_computed_blocks(make_request("c", list(range(9)), cache_salt="tenant-a"))
    assert num_hit == 8


def test_no_hits_without_prefix_caching_or_with_prompt_logprobs() -> None:
    kv = KVCacheManager(10, BLOCK, enable_prefix_caching=False)
    first = make_request("a", list(range(9)))
    compute(kv, first)
    assert first.block_hashes == []
    kv.free(first)
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)

    kv = KVCacheManager(10, BLOCK)
    compute(kv, make_request("a", list(range(9))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)), prompt_logprobs=1)) == ([], 0)


def test_lookup_after_admission_is_refused() -> None:
    kv = KVCacheManager(10, BLOCK)
    request = make_request("a", list(range(9)))
    compute(kv, request)
    with pytest.raises(ValueError, match="after admission"):
        kv.get_computed_blocks(request)


def test_lru_evicts_the_longest_free_and_the_tail_first() -> None:
    kv = KVCacheManager(4, BLOCK)
    a = make_request("a", list(range(8)) + [0])
    b = make_request("b", list(range(100, 108)) + [0])
    compute(kv, a, 8)
    compute(kv, b, 8)
    a_blocks = list(a.block_ids)
    kv.free(a)
    kv.free(b)
    assert kv.num_cached_blocks == 4
    # One new block evicts a's tail block (freed first of all), keeping a's first block.
    newcomer = make_request("c", [50, 51, 52])
    compute(kv, newcomer)
    assert newcomer.block_ids == [a_blocks[1]]
    assert kv.get_computed_blocks(make_request("a2", list(range(8)) + [0]))[1] == 4
    assert kv.get_computed_blocks(make_request("b2", list(range(100, 108)) + [0]))[1] == 8


def test_eviction_removes_the_hash() -> None:
    kv = KVCacheManager(2, BLOCK)
    a = make_request("a", list(range(8)) + [0])
    compute(kv, a, 8)
    kv.free(a)
    b = make_request("b", list(range(20, 28)))
    compute(kv, b)
    assert kv.pool.cached == {h: blk for h, blk in zip(b.block_hashes, b.block_ids)}
    assert kv.get_computed_blocks(make_request("a2", list(range(8)) + [0])) == ([], 0)


def test_allocation_is_all_or_nothing() -> None:
    kv = KVCacheManager(5, BLOCK)
    cached = make_request("a", list(range(9)))
    compute(kv, cached, 8)
    kv.free(cached)
    holder = make_request("h", list(range(50, 58)))
    compute(kv, holder)
    before = (list(kv.pool.ref_counts), kv.num_free_blocks, kv.num_cached_blocks)

    # Needs its two cached blocks back plus two fresh ones; three blocks are free.
    greedy = make_request("g", list(range(9)) + list(range(60, 66)))
    hits, num_hit = kv.get_computed_blocks(greedy)
    assert num_hit == 8
    assert not kv.allocate_slots(greedy, greedy.num_tokens - num_hit, hits, num_hit)
    assert greedy.block_ids == [] and greedy.block_hashes[:2] == cached.block_hashes[:2]
    assert (list(kv.pool.ref_counts), kv.num_free_blocks, kv.num_cached_blocks) == before
    assert kv.take_copies() == []

    # The same request with a shorter step fits: hits revived, then one fresh block.
    assert kv.allocate_slots(greedy, 4, hits, num_hit)
    assert greedy.block_ids[:2] == hits and len(greedy.block_ids) == 3
    assert kv.num_free_blocks == 0


def test_grow_adds_blocks_only_at_block_boundaries() -> None:
    kv = KVCacheManager(8, BLOCK)
    request = make_request("a", [1, 2, 3])
    compute(kv, request)
    blocks = list(request.block_ids)
    for token in (4, 5):
        request.append_output_token(token)
        assert kv.allocate_slots(request, 1)
        request.num_computed_tokens += 1
    assert request.block_ids[:1] == blocks and len(request.block_ids) == 2
    assert len(request.block_hashes) == 1  # the first block became full and was hashed


def test_hashes_only_cover_known_tokens() -> None:
    kv = KVCacheManager(8, BLOCK)
    request = make_request("a", list(range(6)))
    # Room for speculative tokens beyond the known ones: only full known blocks are hashed.
    assert kv.allocate_slots(request, 10)
    assert len(request.block_ids) == 3 and len(request.block_hashes) == 1


def test_copy_on_write_of_a_shared_partial_block() -> None:
    kv = KVCacheManager(8, BLOCK)
    parent = make_request("p", list(range(6)))
    compute(kv, parent, 5)
    child = make_request("c", list(range(6)))
    kv.fork(parent, child)
    child.num_computed_tokens = 5
    assert child.block_ids == parent.block_ids
    assert child.block_hashes == parent.block_hashes
    assert [kv.pool.ref_counts[b] for b in parent.block_ids] == [2, 2]
    shared_partial = parent.block_ids[1]

    assert kv.allocate_slots(parent, 1)
    assert parent.block_ids[0] == child.block_ids[0]
    assert parent.block_ids[1] != shared_partial
    assert kv.take_copies() == [(shared_partial, parent.block_ids[1])]
    assert kv.take_copies() == []

    # The child is now the only owner of the old block and writes in place.
    assert kv.allocate_slots(child, 1)
    assert child.block_ids[1] == shared_partial and kv.take_copies() == []
    assert kv.num_used_blocks == 3


def test_fork_at_a_block_boundary_needs_no_copy() -> None:
    kv = KVCacheManager(8, BLOCK)
    parent = make_request("p", list(range(9)))
    compute(kv, parent, 8)
    child = make_request("c", list(range(9)))
    kv.fork(parent, child)
    child.num_computed_tokens = 8
    assert kv.allocate_slots(parent, 1) and kv.allocate_slots(child, 1)
    assert kv.take_copies() == []
    assert parent.block_ids[:2] == child.block_ids[:2]
    assert parent.block_ids[2] != child.block_ids[2]


def test_fork_refs_outlive_the_parent() -> None:
    kv = KVCacheManager(8, BLOCK)
    parent = make_request("p", list(range(7)))
    compute(kv, parent)
    child = make_request("c", list(range(7)))
    kv.fork(parent, child)
    kv.free(parent)
    assert kv.num_used_blocks == 2 and all(kv.pool.ref_counts[b] == 1 for b in child.block_ids)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.fork(make_request("x", [1]), child)
    kv.free(child)
    assert kv.num_used_blocks == 0


def test_free_forgets_blocks_that_were_never_computed() -> None:
    kv = KVCacheManager(8, BLOCK)
    request = make_request("a", list(range(9)))
    hits, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, 9, hits, num_hit)
    assert len(kv.pool.cached) == 2  # cached when scheduled ...
    kv.free(request)  # ... but preempted before the step ran (num_computed_tokens is still 0)
    assert kv.pool.cached == {} and kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


def test_free_drops_a_pending_copy_into_a_freed_block() -> None:
    kv = KVCacheManager(8, BLOCK)
    parent = make_request("p", list(range(6)))
    compute(kv, parent, 5)
    child = make_request("c", list(range(6)))
    kv.fork(parent, child)
    child.num_computed_tokens = 5
    assert kv.allocate_slots(child, 1)
    kv.free(child)  # preempted in the step that made the copy
    assert kv.take_copies() == []


def test_identical_content_computed_twice_caches_one_copy() -> None:
    kv = KVCacheManager(8, BLOCK)
    a, b = make_request("a", list(range(9))), make_request("b", list(range(9)))
    # Both looked up before either was allocated: neither hits the other.
    assert kv.get_computed_blocks(a) == kv.get_computed_blocks(b) == ([], 0)
    for request in (a, b):
        assert kv.allocate_slots(request, 9)
        request.num_computed_tokens = 9
    assert set(kv.pool.cached.values()) == set(a.block_ids[:2])
    kv.free(a)
    kv.free(b)
    assert kv.num_cached_blocks == 2 and kv.num_free_blocks == 8


def test_mismatched_computed_tokens_are_refused() -> None:
    kv = KVCacheManager(8, BLOCK)
    with pytest.raises(ValueError, match="num_new_computed_tokens"):
        kv.allocate_slots(make_request("a", list(range(9))), 1, [0], 3)


def test_lru_policy_order() -> None:
    lru = LRUEvictionPolicy()
    for block in (3, 1, 2):
        lru.push(block)
    assert len(lru) == 3 and 1 in lru and 7 not in lru
    lru.remove(1)
    assert lru.pop() == 3
    lru.push(1)
    assert [lru.pop(), lru.pop()] == [2, 1]
    lru.push(5)
    with pytest.raises(ValueError, match="already free"):
        lru.push(5)


@pytest.mark.parametrize("hash_fn", [sha256_block_hash, builtin_block_hash])
def test_hash_functions_separate_parent_tokens_and_keys(hash_fn) -> None:
    base = hash_fn(None, (1, 2, 3, 4), None)
    assert base == hash_fn(None, (1, 2, 3, 4), None)
    variants = [
        hash_fn(base, (1, 2, 3, 4), None),
        hash_fn(None, (1, 2, 3, 5), None),
        hash_fn(None, (1, 2, 3, 4), "salt"),
        hash_fn(None, (1, 2, 3, 4), 1),
        hash_fn(None, (1, 2, 3, 4), ("a", ("b", None))),
    ]
    assert len({base, *variants}) == 6
    assert all(isinstance(h, bytes) for h in variants)


def test_sha256_encoding_is_unambiguous_and_typed() -> None:
    tokens = (1, 2)
    assert sha256_block_hash(None, tokens, "1") != sha256_block_hash(None, tokens, 1)
    assert sha256_block_hash(None, tokens, ("a", "b")) != sha256_block_hash(None, tokens, ("ab",))
    assert sha256_block_hash(None, tokens, True) != sha256_block_hash(None, tokens, 1)
    assert sha256_block_hash(None, (1, 2), None) != sha256_block_hash(None, (1,), ("",))
    with pytest.raises(TypeError, match="extra key"):
        sha256_block_hash(None, tokens, 1.5)


def test_sha256_is_stable_across_processes() -> None:
    code = (
        "from pagedserve.plugins.policies.hashing import sha256_block_hash as h;"
        "print(h(h(None, (1, 2), 'salt'), (3, 4), ('lora', 1)).hex())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(digests) == 1
