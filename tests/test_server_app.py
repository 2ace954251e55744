"""The server application and the async engine in-process: all-or-nothing adds, shutdown,
a request the KV cache can never hold, 503 once the engine loop died, and routers that plugins
register."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient

from pagedserve import SamplingParams, hookimpl
from pagedserve.core.async_engine import AsyncLLMEngine, EngineDeadError
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.metrics import EngineMetrics
from pagedserve.core.plugins import PluginManager, get_plugin_manager
from pagedserve.server.app import create_app

pytestmark = pytest.mark.slow

extra_router = APIRouter()


@extra_router.get("/v1/extra")
async def extra() -> dict[str, bool]:
    return {"extra": True}


class RoutesPlugin:
    @hookimpl
    def register_routes(self, register) -> None:
        register("extra", "test_server_app:extra_router")


def build(model: Path, plugins: PluginManager | None = None) -> tuple[AsyncLLMEngine, EngineMetrics]:
    metrics = EngineMetrics("tiny")
    # 6 blocks of 16 tokens: less than one max_model_len sequence.
    config = engine_config_from_args(str(model), dtype="float32", max_model_len=128, num_kv_blocks=6)
    return AsyncLLMEngine(config, plugins=plugins, observers=[metrics]), metrics


@pytest.fixture
def engine(tiny_model) -> Iterator[AsyncLLMEngine]:
    """Not started: the test or the app's lifespan starts it."""
    engine, _ = build(tiny_model())
    yield engine
    engine.shutdown()


def test_adds_are_all_or_nothing_and_shutdown_fails_what_is_pending(engine: AsyncLLMEngine) -> None:
    engine.start()

    async def run() -> None:
        with pytest.raises(ValueError, match="vocabulary"):
            await engine.add_requests(
                ["a", "b"], ["def f():", {"prompt_token_ids": [10**6]}], SamplingParams()
            )
        assert not engine.engine.has_unfinished_requests()  # "a" was taken back
        stream = await engine.add_requests(
            ["c"], ["def f():"], SamplingParams(max_tokens=60, ignore_eos=True)
        )
        first = await anext(aiter(stream))
        assert first.request_id == "c" and not first.finished
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_requests(["d"], ["x"], SamplingParams())

    asyncio.run(run())
    assert not engine.is_running


def test_503_once_the_engine_loop_died(engine: AsyncLLMEngine) -> None:
    def broken_step() -> list:
        raise RuntimeError("a kernel failed")

    app = create_app(engine, EngineMetrics("tiny").registry)
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        too_big = client.post("/v1/completions", json={"prompt": [5] * 20, "max_tokens": 90})
        assert too_big.status_code == 400 and "KV blocks" in too_big.json()["error"]["message"]
        engine.engine.step = broken_step  # the engine thread calls it on the next request
        lines = [
            line
            for line in client.post("/v1/completions", json={"prompt": "x", "stream": True}).iter_lines()
            if line
        ]
        assert json.loads(lines[0].removeprefix("data: "))["error"]["code"] == 503
        assert lines[-1] == "data: [DONE]"
        for response in (
            client.post("/v1/completions", json={"prompt": "x"}),
            client.get("/health"),
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
        ):
            assert response.status_code == 503
            assert response.json()["error"]["code"] == 503 and "Traceback" not in response.text


def test_plugin_routes_are_served_behind_the_api_key(tiny_model) -> None:
    plugins = PluginManager()
    plugins.load_entry_points()
    plugins.register_plugin(RoutesPlugin(), "test-routes")
    engine, metrics = build(tiny_model(), plugins)
    with TestClient(create_app(engine, metrics.registry, api_key="k")) as client:
        assert client.get("/v1/extra").status_code == 401
        assert client.get("/v1/extra", headers={"Authorization": "Bearer k"}).json() == {"extra": True}
    assert not engine.is_running
    assert not plugins.pm.is_registered(metrics)


class ThreadRecorder:
    """Records the thread each engine hook runs on."""

    def __init__(self) -> None:
        self.threads: dict[str, str] = {}

    @hookimpl
    def engine_started(self, engine) -> None:
        self.threads["engine_started"] = threading.current_thread().name

    @hookimpl
    def step_finished(self, stats) -> None:
        self.threads["step_finished"] = threading.current_thread().name


def test_the_engine_is_built_and_stepped_on_its_own_thread(tiny_model) -> None:
    """All of the process's torch work on one thread (a second OpenMP team would share the
    cores with the first): the model is built where it is stepped, and start-up calls run there."""
    recorder = ThreadRecorder()
    config = engine_config_from_args(str(tiny_model()), dtype="float32", max_model_len=64)
    engine = AsyncLLMEngine(config, observers=[recorder])
    try:
        assert recorder.threads["engine_started"] == "pagedserve-engine"
        assert not engine.is_running  # built, not stepping until start
        assert engine.call_before_start(lambda llm: threading.current_thread().name) == "pagedserve-engine"
        with pytest.raises(ZeroDivisionError):
            engine.call_before_start(lambda llm: 1 / 0)
        engine.start()

        async def run() -> None:
            stream = await engine.add_requests(["a"], ["def f():"], SamplingParams(max_tokens=2))
            async for _ in stream:
                pass

        asyncio.run(run())
        assert recorder.threads["step_finished"] == "pagedserve-engine"
        with pytest.raises(RuntimeError, match="after start"):
            engine.call_before_start(lambda llm: None)
    finally:
        engine.shutdown()


def test_a_failed_build_raises_in_the_caller_and_unregisters_observers(tiny_model) -> None:
    recorder = ThreadRecorder()
    config = engine_config_from_args(str(tiny_model()), dtype="float32", max_model_len=64)
    config.model.model = str(tiny_model().parent / "no-such-model")
    with pytest.raises(Exception) as raised:
        AsyncLLMEngine(config, observers=[recorder])
    assert "no-such-model" in str(raised.value)
    assert not get_plugin_manager().pm.is_registered(recorder)
