"""``pagedserve chat`` and ``pagedserve complete`` as real processes fed on stdin: in-process on a
model folder and against a running server by URL, each reply equal to the offline API's greedy
output for the same conversation (so the history and the system prompt are what the model saw)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from server_process import API_KEY, ENGINE_ARGS

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
SAMPLING = ["--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
SYSTEM = "You write Python."
LINES = ["def add(a, b):", "and now subtract"]
#: In-process: the offline engine's dtype and length; one sequence (the commands' default).
ENGINE = ["--dtype", ENGINE_ARGS["dtype"], "--max-model-len", str(ENGINE_ARGS["max_model_len"])]


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    return LLM(str(tiny_model()), **ENGINE_ARGS)


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagedserve", "--log-level", "WARNING", *args], input=stdin,
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def expected_chat(llm: LLM, system: str | None) -> str:
    """The replies the offline API gives turn by turn, each after the whole history."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    messages = [{"role": "system", "content": system}] if system else []
    printed = ""
    for line in LINES:
        messages.append({"role": "user", "content": line})
        reply = llm.chat([messages], params, use_tqdm=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": reply})
        printed += reply + "\n"
    return printed


def expected_completions(llm: LLM, prompts: list[str]) -> str:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    return "".join(out.outputs[0].text + "\n" for out in llm.generate(prompts, params, use_tqdm=False))


def test_chat_in_process_keeps_history_and_system_prompt(tiny_model, llm) -> None:
    result = run("chat", "--model", str(tiny_model()), *ENGINE, *SAMPLING, "--system-prompt", SYSTEM,
                 stdin="\n".join(LINES) + "\nexit\nnot read\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_chat(llm, SYSTEM)


def test_complete_in_process(tiny_model, llm) -> None:
    result = run("complete", "--model", str(tiny_model()), *ENGINE, *SAMPLING, stdin="\n".join(LINES) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected_completions(llm, LINES)


def test_chat_and_complete_against_a_server(server, llm) -> None:
    url = ["--url", f"{server.url}/v1", "--api-key", API_KEY]
    chat = run("chat", *url, *SAMPLING, stdin="\n".join(LINES) + "\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == expected_chat(llm, None)
    quick = run("complete", *url, *SAMPLING, "-q", LINES[0])
    assert quick.returncode == 0, quick.stderr
    assert quick.stdout == expected_completions(llm, LINES[:1])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--url", "http://127.0.0.1:9/v1"], "no server answers"),
        (["--url", "http://127.0.0.1:9/v1", "--model", "x"], "--model-name"),
    ],
)
def test_chat_client_mistakes_are_one_line(args: list[str], needle: str) -> None:
    result = run("chat", *args, stdin="hi\n")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert needle in result.stderr
