"""The paged KV cache's bookkeeping: which blocks each request owns, shared prefixes, eviction.

No tensors here: the model runner owns the KV tensors and addresses them through
``request.block_ids``, which this module alone writes.

A block is either owned (reference count >= 1: held by that many requests) or free (held by the
eviction policy). A full block of a request can be cached under the hash of its content, chained
through every block before it; a free cached block keeps its content until the eviction policy
hands it out again, so a later request with the same prefix takes it back instead of recomputing.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.core.policies import EvictionPolicy, PrefixHashFn
from pagedserve.core.request import Request


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens: reference counts, free blocks, and the
    hash -> block map of cached full blocks."""

    def __init__(self, num_blocks: int, block_size: int, eviction_policy: EvictionPolicy) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}"
            )
        if len(eviction_policy):
            raise ValueError("the eviction policy must start empty: the pool fills it")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        #: The hash each block is cached under, or None.
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free_blocks = eviction_policy
        self._num_free_cached = 0
        for block_id in range(num_blocks):
            self.free_blocks.push(block_id)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_free_cached(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return self._num_free_cached

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def allocate(self, count: int) -> list[int]:
        """Hand out ``count`` free blocks with one reference each; a cached one loses its hash."""
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} blocks, only {self.num_free} are free")
        blocks = []
        for _ in range(count):
            block_id = self.free_blocks.pop()
            if self.block_hashes[block_id] is not None:
                self._num_free_cached -= 1
                self._uncache(block_id)
            self.ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def take(self, block_ids: Sequence[int]) -> None:
        """Add a reference to each block, taking free ones back from the eviction policy."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                self.free_blocks.remove(block_id)
                if self.block_hashes[block_id] is not None:
                    self._num_free_cached -= 1
            self.ref_counts[block_id] += 1

    def release(self, block_id: int, keep_cached: bool = True) -> bool:
        """Drop one reference; returns True when the block became free. A block freed with
        ``keep_cached=False`` loses its hash first (its content is not trustworthy)."""
        if self.ref_counts[block_id] <= 0:
            raise RuntimeError(f"block {block_id} released more often than taken")
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id]:
            return False
        if self.block_hashes[block_id] is not None:
            if keep_cached:
                self._num_free_cached += 1
            else:
                self._uncache(block_id)
        self.free_blocks.push(block_id)
        return True

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Cache an owned full block under ``block_hash``; when another block already holds the
        same content, that one stays the cached copy and this one stays uncached."""
        if self.block_hashes[block_id] is not None or block_hash in self.cached:
            return
        self.block_hashes[block_id] = block_hash
        self.cached[block_hash] = block_id

    def _uncache(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        self.block_hashes[block_id] = None
        if self.cached.get(block_hash) == block_id:
            del self.cached[block_hash]


class KVCacheManager:
    """Allocates blocks to requests under a fixed budget, with prefix caching and copy-on-write.

    Prefix caching needs the attention backend to write a step's new K/V of a layer before it
    attends in that layer: a block is cached as soon as the step that fills it is scheduled, so
    a request admitted later in the same step may already read it.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: PrefixHashFn | None = None,
        eviction_policy: EvictionPolicy | None = None,
    ) -> None:
        if hash_fn is None:
            from pagedserve.plugins.policies.hashing import sha256_block_hash

            hash_fn = sha256_block_hash
        if eviction_policy is None:
            from pagedserve.plugins.policies.eviction import LRUEvictionPolicy

            eviction_policy = LRUEvictionPolicy()
        self.pool = BlockPool(num_blocks, block_size, eviction_policy)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self._copies: list[tuple[int, int]] = []
        #: Prefix-cache lookups, in tokens: looked up and found. Counted per lookup, so a request
        #: that could not be admitted is counted again when it is retried.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- sizes --------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, cached ones (evictable) included."""
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks still holding a cached prefix."""
        return self.pool.num_free_cached

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The cached blocks of the request's leading full blocks and the tokens they hold.

        For a request about to be admitted (``num_computed_tokens == 0``). At most
        ``num_tokens - 1`` tokens, so the last token is computed and yields logits. Takes no
        references: pass the result to ``allocate_slots``.
        """
        if request.num_computed_tokens:
            raise ValueError(f"{request.request_id}: prefix lookup after admission")
        if not self.enable_prefix_caching or request.skip_reading_prefix_cache:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        num_hit_tokens = len(hits) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hits, num_hit_tokens

    def _extend_hashes(self, request: Request, num_full_blocks: int) -> None:
        hashes = request.block_hashes
        size = self.block_size
        tokens = request.all_token_ids
        for index in range(len(hashes), num_full_blocks):
            parent = hashes[-1] if hashes else None
            block_tokens = tuple(tokens[index * size : (index + 1) * size])
            hashes.append(self.hash_fn(parent, block_tokens, request.block_hash_extra_keys))

    # -- allocation ---------------------------------------------------------------------------

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[int] = (),
        num_new_computed_tokens: int = 0,
        num_lookahead_tokens: int = 0,
    ) -> bool:
        """Make ``request.block_ids`` cover ``num_computed_tokens + num_new_computed_tokens +
        num_new_tokens`` tokens, plus ``num_lookahead_tokens`` slots past them (where a draft
        model writes its own KV for the tokens it proposes); all or nothing (False, and no
        change, when blocks run short).

        ``new_computed_blocks`` (from ``get_computed_blocks``) are referenced first, then fresh
        blocks are added. If the first new token goes into a partially filled block that other
        requests share, that block is replaced by a fresh one and ``(src, dst)`` is recorded
        for ``take_copies``. Blocks filled by this step's tokens are cached.
        """
        if num_new_computed_tokens != len(new_computed_blocks) * self.block_size:
            raise ValueError(
                "num_new_computed_tokens must be the number of tokens new_computed_blocks hold"
            )
        pool = self.pool
        start = request.num_computed_tokens + num_new_computed_tokens
        end = start + num_new_tokens
        num_held = len(request.block_ids) + len(new_computed_blocks)
        num_fresh = max(0, self.blocks_needed(end + num_lookahead_tokens) - num_held)
        write_index = start // self.block_size
        copy_on_write = (
            num_new_tokens > 0
            and start % self.block_size != 0
            and write_index < len(request.block_ids)
            and pool.ref_counts[request.block_ids[write_index]] > 1
        )
        num_revived = sum(1 for b in new_computed_blocks if pool.ref_counts[b] == 0)
        if num_fresh + copy_on_write + num_revived > pool.num_free:
            return False

        pool.take(new_computed_blocks)
        request.block_ids.extend(new_computed_blocks)
        if copy_on_write:
            src = request.block_ids[write_index]
            (dst,) = pool.allocate(1)
            pool.release(src)
            request.block_ids[write_index] = dst
            self._copies.append((src, dst))
        request.block_ids.extend(pool.allocate(num_fresh))

        if self.enable_prefix_caching:
            num_full = min(end, request.num_tokens) // self.block_size
            self._extend_hashes(request, num_full)
            for index in range(start // self.block_size, num_full):
                pool.cache(request.block_ids[index], request.block_hashes[index])
        return True

    def cache_computed_blocks(self, request: Request, from_token: int) -> None:
        """Cache the request's blocks that became full of computed tokens from ``from_token``
        on: speculative tokens computed in a step count as the request's own (and may fill a
        block) only once they are accepted, after the step."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        self._extend_hashes(request, num_full)
        for index in range(from_token // self.block_size, num_full):
            self.pool.cache(request.block_ids[index], request.block_hashes[index])

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies ``(src, dst)`` recorded since the last call; the runner must
        copy them before the step's forward."""
        copies, self._copies = self._copies, []
        return copies

    def fork(self, parent: Request, child: Request) -> None:
        """Let ``child`` share every block of ``parent`` (copy-on-write when either writes)."""
        if child.block_ids:
            raise ValueError(f"{child.request_id} already holds blocks; fork it only once")
        self.pool.take(parent.block_ids)
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first so its tail is evicted first.

        Blocks beyond ``request.num_computed_tokens`` were scheduled but never computed (a
        preempted or aborted step); when they become free they lose their cached hash, and a
        pending copy into them is dropped.
        """
        num_valid = request.num_computed_tokens // self.block_size
        freed = set()
        for index in range(len(request.block_ids) - 1, -1, -1):
            block_id = request.block_ids[index]
            if self.pool.release(block_id, keep_cached=index < num_valid):
                freed.add(block_id)
        if freed and self._copies:
            self._copies = [(src, dst) for src, dst in self._copies if dst not in freed]
        request.block_ids = []
