"""A fake model for scheduler tests: no weights, but it reads its context back from the KV slots.

The fake runner stores each computed token in its KV slot and samples the next token from what it
reads back through the request's block ids, as a real model does from its KV cache: a wrong block
table, a missing copy-on-write or a bad prefix hit changes the generated tokens.
"""

from __future__ import annotations

from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.core.scheduler import SchedulerOutput


def next_token(context: list[int], vocab: int) -> int:
    """The fake model: a deterministic function of the whole context."""
    value = 0
    for token in context:
        value = (value * 31 + token + 1) % 1_000_003
    return value % vocab


def reference_tokens(prompt: list[int], num_tokens: int, vocab: int) -> list[int]:
    """What an uninterrupted run of the fake model generates."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(next_token(tokens, vocab))
    return tokens[len(prompt) :]


class FakeRunner:
    """Writes each scheduled token into its KV slot, then samples from what it reads back."""

    def __init__(self, kv: KVCacheManager, vocab: int) -> None:
        self.size = kv.block_size
        self.vocab = vocab
        self.slots: list[list[int | None]] = [[None] * kv.block_size for _ in range(kv.num_blocks)]

    def block(self, request: Request, pos: int) -> list[int | None]:
        return self.slots[request.block_ids[pos // self.size]]

    def execute(self, output: SchedulerOutput) -> dict[str, int]:
        for src, dst in output.blocks_to_copy:
            self.slots[dst] = list(self.slots[src])
        for entry in output.scheduled:
            request = entry.request
            start = request.num_computed_tokens
            assert len(request.block_ids) * self.size >= start + entry.num_new_tokens
            for pos in range(start, start + entry.num_new_tokens):
                self.block(request, pos)[pos % self.size] = request.all_token_ids[pos]
        sampled = {}
        for entry in output.scheduled:
            if entry.sample:
                request = entry.request
                context = [self.block(request, p)[p % self.size] for p in range(request.num_tokens)]
                assert context == request.all_token_ids, f"{request.request_id} read wrong KV"
                sampled[request.request_id] = next_token(context, self.vocab)
        return sampled
