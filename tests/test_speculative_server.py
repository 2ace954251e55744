"""``pagedserve serve --speculative-config``: a real server process, the official client, the
same greedy tokens as offline plain decoding, the spec_decode counters in /metrics, and a
clear refusal of a bad configuration at start-up."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest
from server_process import ENGINE_ARGS, free_port, metric, start_server

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

SPEC = '{"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 0}'
PROMPTS = ["x = 1\nx = 1\nx = 1\n", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    command = [sys.executable, "-m", "pagedserve", "serve", str(tiny_model())]
    log = tmp_path_factory.mktemp("spec-server") / "server.log"
    server = start_server(command, log, free_port(), "--speculative-config", SPEC)
    yield server
    server.stop()


def test_completions_match_offline_plain_decoding(server, tiny_model) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)
    offline = LLM(str(tiny_model()), **ENGINE_ARGS)
    want = offline.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    for prompt, expected in zip(PROMPTS, want):
        got = client.completions.create(model=str(tiny_model()), prompt=prompt, max_tokens=20, temperature=0.0)
        assert got.choices[0].text == expected.outputs[0].text
    assert metric(server, "pagedserve:spec_decode_num_drafts_total") > 0
    accepted = metric(server, "pagedserve:spec_decode_num_accepted_tokens_total")
    assert 0 <= accepted <= metric(server, "pagedserve:spec_decode_num_draft_tokens_total")


def test_bad_speculative_config_stops_the_server_with_a_message(tiny_model) -> None:
    bad = '{"method": "ngram", "num_speculative_tokens": 0}'
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve", "serve", str(tiny_model()), "--speculative-config", bad,
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "num_speculative_tokens must be an integer in [1, 16]" in result.stdout + result.stderr
