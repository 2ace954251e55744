"""A bounded soak of a real server: 128 concurrent streaming clients, a quarter of them leaving
mid-stream, a KV pool too small for the batch (so requests are preempted and recomputed), and
malformed requests mixed in. Afterwards every client that stayed has its exact token count,
the KV cache is empty, nothing is running or waiting, and the server still answers the same
greedy text as before."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections.abc import Iterator

import httpx2
import pytest
from server_process import Server, free_port, metric, start_server

pytestmark = pytest.mark.slow

CLIENTS = 128
#: 40 blocks of 16 tokens: room for about 20 of the 64 sequences a step may hold.
KV_BLOCKS = 40
MALFORMED = [
    (b'{"prompt": "x", "max_tokens": ', "not valid JSON"),
    (json.dumps({"prompt": "x", "n": "2"}).encode(), "valid integer"),
    (json.dumps({"prompt": "x", "temperature": 1e308}).encode(), "temperature"),
    (json.dumps({"prompt": [""]}).encode(), "empty"),
    (json.dumps({"prompt": "x", "n": 64}).encode(), "--max-num-seqs-per-request"),
    (json.dumps({"prompt": "word " * 600}).encode(), "maximum context length"),
]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("soak") / "server.log"
    command = [sys.executable, "-m", "pagedserve", "serve", str(tiny_model())]
    server = start_server(command, log, free_port(), "--num-kv-blocks", str(KV_BLOCKS))
    yield server
    assert server.stop() == 0


def prompt_of(i: int) -> str:
    return f"def function_{i}(x):\n    return x * {i}" + "  # more" * (i % 5)


async def stream_one(http: httpx2.AsyncClient, server: Server, i: int, leave_after: int | None) -> dict:
    """One streaming completion with per-token logprobs; leaves after ``leave_after`` chunks."""
    body = {
        "prompt": prompt_of(i),
        "max_tokens": 8 + i % 25,
        "temperature": 0.0,
        "logprobs": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    tokens, usage, finish = 0, None, None
    async with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                tokens += len(choice["logprobs"]["tokens"])
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                return {"left": True}
    return {"left": False, "tokens": tokens, "usage": usage, "finish": finish, "max_tokens": body["max_tokens"]}


async def malformed_one(http: httpx2.AsyncClient, server: Server, content: bytes, message: str) -> None:
    response = await http.post(
        f"{server.url}/v1/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


async def soak(server: Server) -> list[dict]:
    rng = random.Random(11)
    leave = [rng.randrange(1, 6) if rng.random() < 0.25 else None for _ in range(CLIENTS)]
    limits = httpx2.Limits(max_connections=CLIENTS + len(MALFORMED))
    async with httpx2.AsyncClient(timeout=120, limits=limits) as http:
        streams = [stream_one(http, server, i, leave[i]) for i in range(CLIENTS)]
        bad = [malformed_one(http, server, content, message) for content, message in MALFORMED]
        jobs = streams[: CLIENTS // 2] + bad + streams[CLIENTS // 2 :]  # malformed ones amid the load
        results = await asyncio.gather(*jobs)
    return [r for r in results if r is not None]


def greedy_text(server: Server, i: int) -> str:
    body = {"prompt": prompt_of(i), "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    return httpx2.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def test_soak_leaves_exact_counts_and_an_empty_engine(server: Server) -> None:
    before = [greedy_text(server, i) for i in range(3)]
    results = asyncio.run(soak(server))
    stayed = [r for r in results if not r["left"]]
    assert len(results) == CLIENTS and 0 < len(stayed) < CLIENTS
    for result in stayed:
        assert result["finish"] == "length"
        assert result["tokens"] == result["usage"]["completion_tokens"] == result["max_tokens"]
    assert metric(server, "pagedserve:num_preemptions_total") > 0  # the pool was too small
    assert [greedy_text(server, i) for i in range(3)] == before  # still serving, and the same
    assert metric(server, "pagedserve:kv_cache_usage_perc") == 0
    assert metric(server, "pagedserve:num_requests_running") == 0
    assert metric(server, "pagedserve:num_requests_waiting") == 0
    assert metric(server, "pagedserve:request_success_total", finished_reason="abort") > 0
    assert httpx2.get(f"{server.url}/health").status_code == 200
