"""The dashboard's snapshot parts without a server: the block map, the rate, and
``AsyncLLMEngine.call`` (a read on the engine thread, its errors the caller's)."""

from __future__ import annotations

import asyncio

import pytest

from pagedserve.core.async_engine import AsyncLLMEngine, EngineDeadError
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.request import Request
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.server.dashboard import _Rate, block_map


def test_block_map_marks_used_cached_and_free_blocks() -> None:
    kv = KVCacheManager(8, 4)
    first, second = Request("a", list(range(9)), SamplingParams()), Request("b", [7, 7], SamplingParams())
    assert kv.allocate_slots(first, 9) and kv.allocate_slots(second, 2)
    first.num_computed_tokens = 9
    kv.free(first)  # its two full blocks stay cached, its partial one becomes free
    cells, per_cell = block_map(kv.pool.ref_counts, kv.pool.block_hashes)
    assert per_cell == 1 and len(cells) == 8
    assert cells.count("u") == kv.num_used_blocks == 1 and cells.count("c") == kv.num_cached_blocks == 2
    assert cells.count("f") == 5


def test_a_big_cache_is_drawn_with_cells_of_several_blocks_busiest_first() -> None:
    ref_counts = [0] * 10
    hashes = [None] * 10
    ref_counts[1], hashes[4] = 1, b"h"
    cells, per_cell = block_map(ref_counts, hashes, max_cells=4)
    assert per_cell == 3 and cells == "ucff"  # blocks 0-2 hold one in use, 3-5 a cached one


def test_rate_is_measured_over_a_window() -> None:
    rate = _Rate(window=1.0)
    assert rate.update(0.0, 0) == 0.0
    assert rate.update(0.5, 10) == 0.0  # not a window yet
    assert rate.update(1.0, 30) == pytest.approx(30.0)
    assert rate.update(2.5, 30) == pytest.approx(0.0)  # nothing since 1.0 s


@pytest.mark.slow
def test_call_runs_on_the_engine_thread_and_keeps_it_alive(tiny_model) -> None:
    config = engine_config_from_args(
        str(tiny_model()), dtype="float32", max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64
    )
    engine = AsyncLLMEngine(config)
    engine.start()

    def fails(_engine: object) -> None:
        raise LookupError("the caller's bug")

    async def run() -> None:
        assert await engine.call(lambda e: e.kv_cache.num_blocks) == engine.engine.kv_cache.num_blocks
        with pytest.raises(LookupError):
            await engine.call(fails)
        assert engine.is_running

    asyncio.run(run())
    engine.shutdown()
    with pytest.raises(EngineDeadError):
        asyncio.run(engine.call(lambda e: None))
