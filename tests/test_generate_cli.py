"""``pagedserve generate`` takes the sampling flags it is not given from the model's
generation_config.json, as the server, ``chat`` and vLLM do; a flag given wins."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pagedserve import LLM, SamplingParams
from pagedserve.cli import cli

PROMPT = "def add(a, b):"
MAX_TOKENS = 24
PENALTY = 1.8


@pytest.fixture(scope="module")
def penalised_model(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("penalised")
    shutil.copytree(tiny_model(), folder, dirs_exist_ok=True)
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 1, "temperature": 0.0, "repetition_penalty": PENALTY})
    )
    return folder


def cli_text(folder: Path, *flags: str) -> str:
    args = ["generate", "--model", str(folder), "--dtype", "float32", "--max-tokens", str(MAX_TOKENS), *flags, PROMPT]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output.rstrip("\n")


def test_generate_follows_generation_config_unless_a_flag_is_given(penalised_model: Path) -> None:
    llm = LLM(str(penalised_model), dtype="float32", max_num_seqs=1)
    def offline(penalty: float) -> str:
        params = SamplingParams(temperature=0.0, repetition_penalty=penalty, max_tokens=MAX_TOKENS)
        return llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
    penalised, plain = offline(PENALTY), offline(1.0)
    llm.engine.shutdown()
    assert penalised != plain  # else the test could not tell the default from the flag
    assert cli_text(penalised_model) == penalised
    assert cli_text(penalised_model, "--repetition-penalty", "1.0") == plain


def test_generate_is_greedy_when_the_model_gives_no_defaults(tiny_model) -> None:
    folder = tiny_model()
    llm = LLM(str(folder), dtype="float32", max_num_seqs=1)
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    llm.engine.shutdown()
    assert cli_text(folder) == greedy[0].outputs[0].text
