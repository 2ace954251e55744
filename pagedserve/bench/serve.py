"""A load generator against a running OpenAI-compatible server, like ``vllm bench serve``:
streaming completions at a request rate (Poisson arrivals) or a maximum concurrency, with TTFT,
inter-token latency and end-to-end latency percentiles and the output token throughput."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from pagedserve.bench.workload import BenchRequest


@dataclass
class RequestTiming:
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


async def _one_request(client: Any, model: str, request: BenchRequest) -> RequestTiming:
    timing = RequestTiming()
    start = last = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model,
            prompt=request.prompt_token_ids,
            max_tokens=request.output_len,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        first = True
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                if first:
                    timing.ttft, first = now - start, False
                else:
                    timing.itls.append(now - last)
                last = now
            if chunk.usage is not None:
                timing.output_tokens = chunk.usage.completion_tokens
        timing.e2e = time.perf_counter() - start
    except Exception as exc:  # a failed request is counted, not fatal to the run
        timing.error = f"{type(exc).__name__}: {exc}"
    return timing


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"mean": statistics.mean(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


async def run_load(
    base_url: str,
    workload: list[BenchRequest],
    request_rate: float = float("inf"),
    max_concurrency: int | None = None,
    api_key: str = "EMPTY",
    seed: int = 0,
) -> dict[str, Any]:
    """Send every request of ``workload``; arrivals are Poisson at ``request_rate`` per second
    (all at once when infinite), with at most ``max_concurrency`` in flight."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=3600)
    model = (await client.models.list()).data[0].id
    limit = asyncio.Semaphore(max_concurrency or len(workload))
    rng = random.Random(seed)

    async def limited(request: BenchRequest) -> RequestTiming:
        async with limit:
            return await _one_request(client, model, request)

    start = time.perf_counter()
    tasks = []
    for request in workload:
        tasks.append(asyncio.create_task(limited(request)))
        if request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(request_rate))
    timings = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    await client.close()

    ok = [t for t in timings if t.error is None]
    output_tokens = sum(t.output_tokens for t in ok)
    return {
        "num_requests": len(workload),
        "completed": len(ok),
        "failed": len(timings) - len(ok),
        "errors": sorted({t.error for t in timings if t.error})[:5],
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed,
        "ttft_s": _percentiles([t.ttft for t in ok]),
        "itl_s": _percentiles([itl for t in ok for itl in t.itls]),
        "e2e_s": _percentiles([t.e2e for t in ok]),
    }
