"""The OpenAI-compatible server as clients see it: a real ``pagedserve serve`` process on a free
loopback port, driven with the official ``openai`` SDK (sync and async, streaming and not) and
compared with the offline ``LLM`` on the same model."""

from __future__ import annotations

import asyncio
import math
import sys
import time
from pathlib import Path

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_process import (
    API_KEY,
    ENGINE_ARGS,
    MAX_MODEL_LEN,
    Server,
    free_port,
    metric,
    parse_metric,
    port_is_free,
    start_server,
)

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Config:\n    def __init__(self):"]
MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model()


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), **ENGINE_ARGS)


def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


# -- outputs equal the offline engine's -----------------------------------------------------------

GREEDY = {"temperature": 0.0, "max_tokens": 20}
SEEDED = {"temperature": 0.9, "top_p": 0.9, "seed": 7, "max_tokens": 20}


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_completions_equal_offline_generate(client, llm, model_dir, sampling) -> None:
    expected = llm.generate(PROMPTS, SamplingParams(n=2, **sampling), use_tqdm=False)
    response = client.completions.create(model=str(model_dir), prompt=PROMPTS, n=2, **sampling)
    assert [c.index for c in response.choices] == list(range(2 * len(PROMPTS)))
    for choice in response.choices:
        offline = expected[choice.index // 2].outputs[choice.index % 2]
        assert choice.text == offline.text
        assert choice.finish_reason == offline.finish_reason
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == sum(len(c.token_ids) for o in expected for c in o.outputs)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completions_from_token_ids(client, llm, model_dir) -> None:
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    expected = llm.generate({"prompt_token_ids": ids}, SamplingParams(**GREEDY), use_tqdm=False)[0]
    response = client.completions.create(model=str(model_dir), prompt=[ids, ids], **GREEDY)
    assert [c.text for c in response.choices] == [expected.outputs[0].text] * 2


def test_streamed_completion_equals_the_whole_one(client, model_dir) -> None:
    whole = client.completions.create(model=str(model_dir), prompt=PROMPTS[1], **SEEDED)
    chunks = list(
        client.completions.create(
            model=str(model_dir),
            prompt=PROMPTS[1],
            stream=True,
            stream_options={"include_usage": True},
            **SEEDED,
        )
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_equals_offline_chat(client, llm, model_dir) -> None:
    expected = llm.chat(MESSAGES, SamplingParams(**SEEDED), use_tqdm=False)[0]
    response = client.chat.completions.create(model=str(model_dir), messages=MESSAGES, **SEEDED)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert response.usage.completion_tokens == len(expected.outputs[0].token_ids)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Sort a list."}]}]
    as_parts = client.chat.completions.create(model=str(model_dir), messages=parts, **GREEDY)
    as_text = client.chat.completions.create(model=str(model_dir), messages=MESSAGES[1:], **GREEDY)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content


def test_async_chat_stream_starts_with_the_role_and_numbers_its_choices(server, llm, model_dir) -> None:
    expected = llm.chat(MESSAGES, SamplingParams(n=2, **SEEDED), use_tqdm=False)[0]

    async def run() -> tuple:
        async with async_client(server) as aclient:
            request = {"model": str(model_dir), "messages": MESSAGES, "n": 2, **SEEDED}
            whole = await aclient.chat.completions.create(**request)
            stream = await aclient.chat.completions.create(
                **request, stream=True, stream_options={"include_usage": True}
            )
            return whole, [chunk async for chunk in stream]

    whole, chunks = asyncio.run(run())
    assert [c.message.content for c in whole.choices] == [c.text for c in expected.outputs]
    assert [c.choices[0].delta.role for c in chunks[:2]] == ["assistant", "assistant"]
    assert {c.choices[0].index for c in chunks[:2]} == {0, 1}
    for index in (0, 1):
        deltas = [c.choices[0] for c in chunks[2:-1] if c.choices[0].index == index]
        assert "".join(d.delta.content or "" for d in deltas) == expected.outputs[index].text
        assert deltas[-1].finish_reason == expected.outputs[index].finish_reason
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in expected.outputs)


def test_a_stop_string_never_leaks_into_the_stream(client, llm, model_dir) -> None:
    text = llm.generate(PROMPTS[2], SamplingParams(**GREEDY), use_tqdm=False)[0].outputs[0].text
    stop = text[8:11]  # from the middle of the greedy output, so it does stop there
    expected = llm.generate(PROMPTS[2], SamplingParams(stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    chunks = list(
        client.completions.create(model=str(model_dir), prompt=PROMPTS[2], stop=[stop], stream=True, **GREEDY)
    )
    streamed = "".join(c.choices[0].text for c in chunks)
    assert streamed == expected.text and stop not in streamed
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].choices[0].stop_reason == stop


def test_logprobs(client, llm, model_dir) -> None:
    offline = llm.generate(
        PROMPTS[0], SamplingParams(logprobs=2, prompt_logprobs=2, **GREEDY), use_tqdm=False
    )[0]
    response = client.completions.create(
        model=str(model_dir), prompt=PROMPTS[0], logprobs=2, echo=True, **GREEDY
    )
    choice = response.choices[0]
    num_prompt = len(offline.prompt_token_ids)
    assert choice.text.startswith(PROMPTS[0])
    assert len(choice.logprobs.tokens) == num_prompt + len(offline.outputs[0].token_ids)
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    token_ids = offline.prompt_token_ids + offline.outputs[0].token_ids
    entries = offline.prompt_logprobs[1:] + offline.outputs[0].logprobs
    for logprob, token, entry in zip(choice.logprobs.token_logprobs[1:], token_ids[1:], entries):
        assert math.isclose(logprob, entry[token].logprob, abs_tol=1e-4)
    for token, top in zip(choice.logprobs.tokens[1:], choice.logprobs.top_logprobs[1:]):
        assert token in top and len(top) <= 3  # the top 2 and the chosen token, keyed by their text

    chat = client.chat.completions.create(
        model=str(model_dir), messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert [t.logprob for t in item.top_logprobs] == sorted(
            (t.logprob for t in item.top_logprobs), reverse=True
        )
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.logprob - 1e-6
        assert bytes(item.bytes).decode(errors="replace") == item.token


# -- concurrency, disconnects, metrics ----------------------------------------------------------------


def test_64_concurrent_streaming_clients(server, llm, model_dir) -> None:
    prompts = [f"def function_{i}(x):\n    return x * {i}" for i in range(64)]
    lengths = [8 + i % 13 for i in range(64)]
    expected = llm.generate(
        prompts,
        [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths],
        use_tqdm=False,
    )

    async def one(aclient: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[str, object]:
        stream = await aclient.completions.create(
            model=str(model_dir),
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage

    def engine_steps() -> float:
        return parse_metric(httpx2.get(f"{server.url}/metrics").text, "pagedserve:iteration_tokens_total_count")

    async def run() -> list:
        async with async_client(server) as aclient:
            return await asyncio.gather(*(one(aclient, p, n) for p, n in zip(prompts, lengths)))

    steps_before = engine_steps()
    results = asyncio.run(run())
    # The clients' requests shared steps (continuous batching across clients): one at a time, a
    # request of n tokens takes n steps (its prefill gives the first), so fewer steps than
    # tokens in all means some step served several. Counted by the server's own step histogram,
    # not by sampling the running gauge while they run, which a loaded machine could miss.
    assert engine_steps() - steps_before < sum(lengths)
    for (text, usage), out, max_tokens in zip(results, expected, lengths):
        assert text == out.outputs[0].text
        assert usage.completion_tokens == max_tokens
        assert usage.prompt_tokens == len(out.prompt_token_ids)


def test_a_disconnected_stream_frees_its_blocks(client, server, model_dir) -> None:
    aborted = metric(server, "pagedserve:request_success_total", finished_reason="abort")
    stream = client.completions.create(
        model=str(model_dir), prompt=PROMPTS[0], max_tokens=480, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    assert metric(server, "pagedserve:kv_cache_usage_perc") > 0
    assert metric(server, "pagedserve:num_requests_running") == 1
    stream.close()
    deadline = time.monotonic() + 20
    while metric(server, "pagedserve:kv_cache_usage_perc") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "pagedserve:kv_cache_usage_perc") == 0
    assert metric(server, "pagedserve:num_requests_running") == 0
    assert metric(server, "pagedserve:request_success_total", finished_reason="abort") == aborted + 1


def test_metrics_parse_and_move(client, server, model_dir) -> None:
    names = {
        s.name
        for f in text_string_to_metric_families(httpx2.get(f"{server.url}/metrics").text)
        for s in f.samples
    }
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "num_preemptions_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_sum",
        "request_queue_time_seconds_count",
        "request_success_total",
        "iteration_tokens_total_bucket",
    ):
        assert f"pagedserve:{name}" in names
    before = {
        name: metric(server, f"pagedserve:{name}")
        for name in (
            "prompt_tokens_total",
            "generation_tokens_total",
            "time_to_first_token_seconds_count",
            "inter_token_latency_seconds_count",
            "e2e_request_latency_seconds_count",
            "prefix_cache_hits_total",
            "iteration_tokens_total_count",
        )
    }
    length = metric(server, "pagedserve:request_success_total", finished_reason="length")
    for _ in range(2):  # the second one hits the prefix cache
        response = client.completions.create(
            model=str(model_dir),
            prompt=PROMPTS[1] * 3,
            max_tokens=5,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
    usage = response.usage
    moved = {name: metric(server, f"pagedserve:{name}") - value for name, value in before.items()}
    assert moved["prompt_tokens_total"] == 2 * usage.prompt_tokens
    assert moved["generation_tokens_total"] == 2 * usage.completion_tokens
    assert moved["time_to_first_token_seconds_count"] == 2
    assert moved["inter_token_latency_seconds_count"] == 2 * (usage.completion_tokens - 1)
    assert moved["e2e_request_latency_seconds_count"] == 2
    assert moved["prefix_cache_hits_total"] > 0
    # One step per token: the prompt (or what the prefix cache lacks) with the first, then one each.
    assert moved["iteration_tokens_total_count"] == 2 * usage.completion_tokens
    assert metric(server, "pagedserve:request_success_total", finished_reason="length") == length + 2


# -- the other endpoints ------------------------------------------------------------------------------


def test_models_health_version_tokenize(client, server, llm, model_dir) -> None:
    (card,) = client.models.list().data
    assert card.id == str(model_dir) and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx2.get(f"{server.url}/health").status_code == 200
    assert httpx2.get(f"{server.url}/version").json()["version"]
    tokenizer = llm.get_tokenizer()
    tokens = httpx2.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[1]}).json()
    assert tokens == {
        "count": len(tokenizer.encode(PROMPTS[1])),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": tokenizer.encode(PROMPTS[1]),
    }
    chat_tokens = httpx2.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert (
        chat_tokens["tokens"]
        == llm.chat(MESSAGES, SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt_token_ids
    )
    text = httpx2.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": PROMPTS[1]}


def test_sigterm_shuts_down_cleanly(model_dir, tmp_path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "pagedserve.server", "--model", str(model_dir)]
    server = start_server(command, tmp_path / "server.log", port, "--served-model-name", "tiny")
    assert httpx2.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "tiny"
    assert not port_is_free(port)
    assert server.stop() == 0, server.log.read_text()
    assert port_is_free(port)
    log = server.log.read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log
