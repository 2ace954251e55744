"""Start-up: the warm-up is sized to what the configuration can batch, and the engine logs where
its start-up time went (the times themselves are measured by ``pagedserve bench startup``)."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from pagedserve import LLM
from pagedserve.core import startup

pytestmark = pytest.mark.slow


def test_warm_up_is_sized_to_what_one_step_can_hold(tiny_model, monkeypatch, caplog) -> None:
    from pagedserve.core.model_runner import ModelRunner

    sizes: list[int] = []
    step = ModelRunner._dummy_step
    monkeypatch.setattr(ModelRunner, "_dummy_step", lambda self, n: (sizes.append(n), step(self, n))[1])
    monkeypatch.setattr(startup, "SLOW_PHASE_SECONDS", 0.0)  # every phase counts as slow here
    with caplog.at_level(logging.INFO, logger="pagedserve.startup"):
        one = LLM(str(tiny_model()), dtype="float32", max_model_len=64, max_num_seqs=1)
        many = LLM(str(tiny_model()), dtype="float32", max_model_len=64, max_num_seqs=8,
                   max_num_batched_tokens=256)
        tight = LLM(str(tiny_model()), dtype="float32", max_model_len=64, block_size=4, num_kv_blocks=10)
    # One sequence: one request's length, not the 2048-token budget; eight: the budget (256 < 8 x 64);
    # a cache of 10 blocks of 4 tokens: what the cache holds.
    assert sizes == [64, 256, 40]
    assert [e.runner.largest_step_tokens() for e in (one.engine, many.engine, tight.engine)] == sizes
    assert one.engine.kv_cache.num_free_blocks == 64 // 16  # one full-length sequence, no more
    assert all(not kv.any() for kv in tight.engine.runner.kv_caches)

    messages = [r.getMessage() for r in caplog.records]
    for name in ("model config", "tokenizer", "weights", "KV cache", "warm-up"):
        assert any(re.fullmatch(rf"{name} took \d+\.\d\d s", m) for m in messages), (name, messages)
    ready = [m for m in messages if m.startswith("engine ready in")]
    assert len(ready) == 3 and all("weights" in m and "warm-up" in m for m in ready), ready


def test_a_fast_phase_is_logged_at_debug_only(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="pagedserve.startup"):
        with startup.startup("thing"):
            with startup.phase("quick"):
                torch.zeros(1)
    levels = {r.getMessage().split(" took")[0]: r.levelno for r in caplog.records}
    assert levels["quick"] == logging.DEBUG
    assert any(r.levelno == logging.INFO and r.getMessage().startswith("thing ready in") for r in caplog.records)
