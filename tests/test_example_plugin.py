"""The worked example of docs/plugins.md (examples/pagedserve-example-plugin), installed by pip
into a folder of its own and used as a user would: its per-request logits processor turned on
over HTTP with vllm_xargs, its route, its command, its sampler, and what `pagedserve plugins`
says it adds. Also the engine's `logits_processors` (vLLM's `--logits-processors`), in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import openai
import pytest

from pagedserve import LLM, SamplingParams
from server_process import ENGINE_ARGS, free_port, start_server

pytestmark = pytest.mark.slow

SOURCE = Path(__file__).parent.parent / "examples" / "pagedserve-example-plugin"
PROCESSOR = "pagedserve_example_plugin.processors:BannedTokensProcessor"
PROMPT = "def fibonacci(n):"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package, built and installed by pip into a folder of its own."""
    target = tmp_path_factory.mktemp("example-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(SOURCE)],
        check=True, cwd=tmp_path_factory.mktemp("example-build"),
    )
    return target


def pagedserve(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pagedserve", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, env=env, timeout=180)


@pytest.fixture(scope="module")
def server(site: Path, tiny_model, tmp_path_factory: pytest.TempPathFactory):
    command = [sys.executable, "-m", "pagedserve", "serve", str(tiny_model())]
    running = start_server(command, tmp_path_factory.mktemp("example-server") / "server.log", free_port(),
                           env={"PYTHONPATH": str(site)})
    yield running
    running.stop()


@pytest.fixture(scope="module")
def llm(site: Path, tiny_model) -> LLM:
    """Offline, with the example's processor named by class (not registered: this process has
    not installed the plugin)."""
    sys.path.insert(0, str(site))
    try:
        return LLM(str(tiny_model()), **ENGINE_ARGS, logits_processors=[PROCESSOR])
    finally:
        sys.path.remove(str(site))


def greedy(llm: LLM, **extra_args: object) -> tuple[str, list[int]]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args=extra_args or None)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    return out.text, list(out.token_ids)


def test_vllm_xargs_reach_the_plugins_processor_over_http(server, llm) -> None:
    text, tokens = greedy(llm)
    banned = tokens[:2]
    expected, expected_tokens = greedy(llm, banned_token_ids=banned)
    assert expected != text and not set(banned) & set(expected_tokens)  # the option does something
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert plain.choices[0].text == text
    for stream in (False, True):
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                          stream=stream, extra_body={"vllm_xargs": {"banned_token_ids": banned}})
        got = "".join(c.choices[0].text for c in reply if c.choices) if stream else reply.choices[0].text
        assert got == expected
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"vllm_xargs": {"banned_token_ids": banned}})
    assert chat.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(openai.BadRequestError, match="banned_token_ids must be a list of token ids"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2,
                                  extra_body={"vllm_xargs": {"banned_token_ids": "x"}})


def test_the_plugins_route_and_what_pagedserve_plugins_lists(server, site: Path) -> None:
    assert httpx2.get(f"{server.url}/example/options").json() == {
        "banned_token_ids": "token ids never sampled for the request"
    }
    listed = {row["name"]: row for row in json.loads(pagedserve(site, "plugins", "--json").stdout)}
    example = listed["example"]
    assert example["distribution"] == "pagedserve-example-plugin" and example["version"] == "0.1.0"
    assert example["registers"] == {"logits_processors": ["banned_tokens"], "samplers": ["argmax"],
                                    "routes": ["example"], "commands": ["banned-ids"]}
    assert example["http_routes"] == ["GET /example/options"]


def test_the_plugins_command_and_sampler(site: Path, tiny_model, llm) -> None:
    result = pagedserve(site, "banned-ids", "--model", str(tiny_model()), "def")
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)["banned_token_ids"]
    assert ids == sorted(set(llm.get_tokenizer().encode("def", add_special_tokens=False)
                             + llm.get_tokenizer().encode(" def", add_special_tokens=False)))
    # --sampler argmax decodes greedily even when the request asks for temperature 1.
    sampled = pagedserve(site, "generate", "--model", str(tiny_model()), "--dtype", "float32", "--sampler", "argmax",
                         "--temperature", "1.0", "--sampling-seed", "3", "--max-tokens", str(MAX_TOKENS), PROMPT)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout == greedy(llm)[0] + "\n"
    unknown = pagedserve(site, "generate", "--model", str(tiny_model()), "--sampler", "nosuch", PROMPT)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "unknown samplers 'nosuch'; known: argmax, default" in unknown.stderr
