"""The torch_ref paged attention backend against plain dense causal attention."""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagedserve.core.forward_context import TracedDecodeStep, build_batch_layout
from pagedserve.core.layers.attention import Attention
from pagedserve.core.plugins import get_plugin_manager
from pagedserve.plugins.attention.torch_ref import backend as backend_module
from pagedserve.plugins.attention.torch_ref.backend import TorchRefBackend, group_by_length

HEAD_SIZE = 8
NUM_HEADS = 4


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int, window: int | None, scale: float,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """q [Q, H, D] at positions first_position.., k/v [S, Hkv, D] at 0..S-1, in float64 (scores
    capped to ``soft_cap * tanh(s / soft_cap)`` when given, as HF Gemma 2's eager attention)."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    query_pos = torch.arange(first_position, first_position + q.shape[0])[:, None]
    key_pos = torch.arange(k.shape[0])[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def run_case(
    rng: random.Random,
    contexts: list[int],
    new_tokens: list[int],
    num_kv_heads: int,
    block_size: int,
    window: int | None,
    dtype: torch.dtype = torch.float32,
    soft_cap: float | None = None,
    consecutive_blocks: bool = False,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each request's context into a paged cache, attend its new tokens; return (ours, dense).
    ``traced``: through ``traced_decode`` (every request one new token), its block tables three
    columns wider than needed (their padding reads garbage blocks the mask must drop)."""
    layer = Attention(
        NUM_HEADS, HEAD_SIZE, HEAD_SIZE**-0.5, num_kv_heads, sliding_window=window, logits_soft_cap=soft_cap
    )
    backend = TorchRefBackend(config=None)
    num_blocks = sum(math.ceil((c + n) / block_size) for c, n in zip(contexts, new_tokens)) + 3
    # Unused slots hold large garbage (finite, as in a zero-filled cache reused by other requests):
    # any key or value read outside the mask would show.
    shape = backend.kv_cache_shape(num_blocks, block_size, num_kv_heads, HEAD_SIZE)
    cache = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 1e3).to(dtype)
    free = list(range(num_blocks))[::-1] if consecutive_blocks else list(range(num_blocks))
    if not consecutive_blocks:
        rng.shuffle(free)

    seqs, queries, keys, values, expected = [], [], [], [], []
    for context, new in zip(contexts, new_tokens):
        total = context + new
        blocks = [free.pop() for _ in range(math.ceil(total / block_size))]
        k = torch.randn(total, num_kv_heads, HEAD_SIZE).to(dtype)
        v = torch.randn(total, num_kv_heads, HEAD_SIZE).to(dtype)
        q = torch.randn(new, NUM_HEADS, HEAD_SIZE).to(dtype)
        for pos in range(context):  # the context is already in the cache
            block, offset = blocks[pos // block_size], pos % block_size
            cache[0, block, offset], cache[1, block, offset] = k[pos], v[pos]
        seqs.append((blocks, context, new))
        queries.append(q)
        keys.append(k[context:])
        values.append(v[context:])
        expected.append(dense_attention(q, k, v, context, window, layer.scale, soft_cap))

    layout = build_batch_layout(seqs, block_size, "cpu")
    if traced:
        step = TracedDecodeStep()
        step.backend, step.seq_lens, step.slot_mapping = backend, layout.seq_lens, layout.slot_mapping
        step.block_tables = torch.nn.functional.pad(layout.block_tables, (0, 3), value=num_blocks - 1)
        out = backend.traced_decode(layer, torch.cat(queries), torch.cat(keys), torch.cat(values), cache, step)
        return out, torch.cat(expected)
    metadata = backend.build_metadata(layout)
    out = backend.forward(layer, torch.cat(queries), torch.cat(keys), torch.cat(values), cache, metadata)
    return out, torch.cat(expected)


@pytest.mark.parametrize("seed", range(16))
def test_random_batches_match_dense_attention(seed: int) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    num_reqs = rng.randint(1, 5)
    contexts = [rng.choice([0, rng.randint(1, 30)]) for _ in range(num_reqs)]
    new_tokens = [1 if c and rng.random() < 0.5 else rng.randint(1, 12) for c in contexts]
    out, expected = run_case(
        rng,
        contexts,
        new_tokens,
        num_kv_heads=rng.choice([1, 2, 4]),
        block_size=rng.choice([1, 4, 8, 16]),
        window=rng.choice([None, None, rng.randint(1, 10)]),
        soft_cap=rng.choice([None, None, 0.5, 2.0]),
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "contexts", "new_tokens"),
    [
        ("prefill", [0, 0, 0], [7, 1, 13]),
        ("decode", [5, 16, 1, 33], [1, 1, 1, 1]),
        ("mixed", [0, 9, 12, 4], [6, 1, 5, 1]),
        ("prefix-context", [8, 17], [8, 3]),
    ],
)
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (3, None), (None, 1.0), (3, 1.0)])
def test_batch_shapes_match_dense_attention(
    name: str, contexts: list[int], new_tokens: list[int], num_kv_heads: int, window: int | None,
    soft_cap: float | None,
) -> None:  # fmt: skip
    torch.manual_seed(0)
    out, expected = run_case(random.Random(name), contexts, new_tokens, num_kv_heads, 4, window, soft_cap=soft_cap)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    if soft_cap is not None:  # the cap must change the result, or the comparison proves nothing
        uncapped, _ = run_case(random.Random(name), contexts, new_tokens, num_kv_heads, 4, window)
        assert (uncapped - out).abs().max() > 1e-2


@pytest.mark.parametrize(("context", "block_size"), [(32, 16), (33, 4), (1, 1)])
@pytest.mark.parametrize("window", [None, 3, 100])
def test_one_decode_in_consecutive_blocks_reads_a_slice_of_the_cache(
    context: int, block_size: int, window: int | None
) -> None:
    torch.manual_seed(0)
    out, expected = run_case(random.Random(0), [context], [1], 2, block_size, window, consecutive_blocks=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    blocks = list(range(math.ceil((context + 1) / block_size)))
    metadata = TorchRefBackend(config=None).build_metadata(build_batch_layout([(blocks, context, 1)], block_size, "cpu"))
    assert metadata.decode_groups[0].contiguous == (0, context + 1)


@pytest.mark.parametrize(("contexts", "new_tokens", "block_size"),
                         [([30], [5], 16), ([33, 7], [9, 3], 4), ([1], [2], 1), ([5], [40], 8)])
@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
@pytest.mark.parametrize(("window", "soft_cap"), [(None, None), (3, None), (100, None), (None, 1.0)])
def test_several_new_tokens_in_consecutive_blocks_read_a_slice_of_the_cache(
    contexts: list[int], new_tokens: list[int], block_size: int, num_kv_heads: int, window: int | None,
    soft_cap: float | None,
) -> None:  # fmt: skip
    """A speculative verification's or a draft's catch-up's shape (a cached context, a few new
    tokens) attended from a slice of the cache under the span's folded mask; a later prefill
    chunk (40 new tokens) from a slice, unfolded."""
    torch.manual_seed(0)
    out, expected = run_case(random.Random(0), contexts, new_tokens, num_kv_heads, block_size, window,
                             soft_cap=soft_cap, consecutive_blocks=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    seqs, first = [], 0
    for context, new in zip(contexts, new_tokens):
        count = math.ceil((context + new) / block_size)
        seqs.append((list(range(first, first + count)), context, new))
        first += count
    metadata = TorchRefBackend(config=None).build_metadata(build_batch_layout(seqs, block_size, "cpu"))
    assert [span.first_block for span in metadata.spans] == [s[0][0] for s in seqs]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_close_to_fp64(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    out, expected = run_case(random.Random(0), [0, 20, 7], [9, 1, 4], 2, 4, None, dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_new_keys_and_values_are_written_at_their_slots() -> None:
    backend = TorchRefBackend(config=None)
    layer = Attention(NUM_HEADS, HEAD_SIZE, 1.0, 2)
    cache = torch.zeros(backend.kv_cache_shape(6, 4, 2, HEAD_SIZE))
    layout = build_batch_layout([([5, 2], 3, 2), ([0], 0, 1)], 4, "cpu")
    key = torch.randn(3, 2, HEAD_SIZE)
    value = torch.randn(3, 2, HEAD_SIZE)
    backend.forward(layer, torch.randn(3, NUM_HEADS, HEAD_SIZE), key, value, cache, backend.build_metadata(layout))
    # Positions 3 and 4 of the first request: block 5 offset 3, block 2 offset 0.
    torch.testing.assert_close(cache[0, 5, 3], key[0])
    torch.testing.assert_close(cache[1, 2, 0], value[1])
    torch.testing.assert_close(cache[0, 0, 0], key[2])


def test_backend_is_registered_as_the_lowest_priority_default() -> None:
    entry = get_plugin_manager().registry("attention_backends").get("torch_ref")
    assert entry.metadata["priority"] == 0
    assert entry.load() is TorchRefBackend
    assert TorchRefBackend.supports(None) is None


def test_group_by_length_cuts_where_the_padding_saved_exceeds_a_group() -> None:
    # Longest first: 10; 9 saves 1 slot for each of the 4 left (4 <= 5: same group); 3 saves
    # 7 * 3 = 21 > 5 (new group); 2 saves 1 * 2 (same group); 1 saves 2 * 1 (same group).
    assert group_by_length([3, 10, 1, 9, 2], cost=5) == [[1, 3], [0, 4, 2]]
    assert group_by_length([4, 4, 4], cost=0) == [[0, 1, 2]]
    assert group_by_length([], cost=5) == []
    assert sorted(map(sorted, group_by_length([7, 1, 50], cost=0))) == [[0], [1], [2]]


@pytest.mark.parametrize("cost", [0, 64, 10**9])
def test_decode_groups_of_any_split_match_dense_attention(monkeypatch: pytest.MonkeyPatch, cost: int) -> None:
    """Very different context lengths, split into one group per length (cost 0), a few, or one."""
    monkeypatch.setattr(backend_module, "GROUP_COST_SLOTS", cost)
    torch.manual_seed(0)
    contexts = [3, 200, 5, 120, 7, 64, 65, 1]
    out, expected = run_case(random.Random(1), contexts, [1] * len(contexts), 2, 8, None)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_traced_decode_matches_dense_attention(seed: int) -> None:
    """The compiled decode step's attention (plain torch ops, run eagerly here; the compiled
    engine tests trace it): GQA, sliding windows, soft-capping, contexts across blocks."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    contexts = [rng.randint(0, 40) for _ in range(rng.randint(1, 5))]
    out, expected = run_case(
        rng, contexts, [1] * len(contexts), num_kv_heads=rng.choice([1, 2, 4]), block_size=rng.choice([1, 4, 16]),
        window=rng.choice([None, rng.randint(1, 10)]), soft_cap=rng.choice([None, 0.5]), traced=True,
    )
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_traced_decode_in_half_precision_stays_close_to_fp64(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    out, expected = run_case(random.Random(0), [20, 7, 0], [1, 1, 1], 2, 4, None, dtype, traced=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_traced_decode_writes_the_cache_when_compiled() -> None:
    """Compiled, the new K/V land in the cache tensor passed in, at their slots and nowhere else."""
    backend = TorchRefBackend(config=None)
    layer = Attention(NUM_HEADS, HEAD_SIZE, 1.0, 2)
    cache = torch.zeros(backend.kv_cache_shape(6, 4, 2, HEAD_SIZE))
    layout = build_batch_layout([([5, 2], 4, 1), ([0], 0, 1)], 4, "cpu")
    key, value = torch.randn(2, 2, HEAD_SIZE), torch.randn(2, 2, HEAD_SIZE)
    step = TracedDecodeStep()
    step.backend, step.block_tables, step.seq_lens, step.slot_mapping = (
        backend, layout.block_tables, layout.seq_lens, layout.slot_mapping)
    attend = torch.compile(backend.traced_decode, fullgraph=True, dynamic=False)
    attend(layer, torch.randn(2, NUM_HEADS, HEAD_SIZE), key, value, cache, step)
    torch.testing.assert_close(cache[0, 2, 0], key[0])  # position 4 of the first request
    torch.testing.assert_close(cache[1, 2, 0], value[0])
    torch.testing.assert_close(cache[0, 0, 0], key[1])
    assert cache.count_nonzero() == 2 * 2 * 2 * HEAD_SIZE
