"""The bundled models' tokenizer files load with transformers 4.45+ as well as 5.x: client tools
pinned to transformers 4 (guidellm 0.4, older lm-eval) read the default model's tokenizer.

transformers 5 writes ``tokenizer_class: TokenizersBackend`` (a name 4.x does not know) and
4.x before 4.50 reads the chat template only from tokenizer_config.json: the bundled files name
``PreTrainedTokenizerFast`` (the same class in 5.x) and carry the template inline too."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from pagedserve.assets import ASSETS_DIR, BUNDLED_MODELS

FOLDERS = sorted({ASSETS_DIR / folder for folder in BUNDLED_MODELS.values()})
PROBE = Path(__file__).parent / "tokenizer_probe.py"
#: The oldest transformers pagedserve declares (pyproject: transformers>=4.45).
OLD_TRANSFORMERS = "4.45.2"
#: Kept between runs: building it downloads transformers 4 and tokenizers 0.20 once.
OLD_VENV = Path.home() / ".cache" / "pagedserve-tests" / f"transformers-{OLD_TRANSFORMERS}"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_tokenizer_config_is_readable_by_transformers_4(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class 4.x and 5.x both have
    assert "backend" not in config  # 5.x only
    assert config["chat_template"] == (folder / "chat_template.jinja").read_text()


def probe(python: str) -> dict:
    result = subprocess.run(
        [python, str(PROBE), *map(str, FOLDERS)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def old_transformers_python() -> str:
    """A venv of its own with transformers 4.45 (and its tokenizers, huggingface_hub) in it, built
    once: without pip of its own (this venv's pip installs into it, ``--python``, which skips
    ensurepip's pip and setuptools) and without compiling bytecode (the probe imports a few
    hundred of transformers' thousands of modules)."""
    python = OLD_VENV / "bin" / "python"
    if not python.exists():
        venv.create(OLD_VENV, with_pip=False, clear=True)
        install = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
             "--disable-pip-version-check", f"transformers=={OLD_TRANSFORMERS}", "jinja2"],
            capture_output=True, text=True, timeout=600,
        )
        if install.returncode != 0:
            python.unlink(missing_ok=True)
            pytest.skip(f"could not install transformers {OLD_TRANSFORMERS} (no package index?): {install.stderr[-500:]}")
    return str(python)


@pytest.mark.slow
def test_transformers_4_and_5_tokenize_the_bundled_models_alike() -> None:
    old, new = probe(old_transformers_python()), probe(sys.executable)
    assert old["transformers"] == OLD_TRANSFORMERS and new["transformers"].startswith("5.")
    for folder in map(str, FOLDERS):
        was, now = old["tokenizers"][folder], new["tokenizers"][folder]
        assert was["class"] == "PreTrainedTokenizerFast"
        for field in ("ids", "decoded", "chat", "special", "len"):
            assert was[field] == now[field], (folder, field)
