"""The mistakes a new user makes get one line on stderr, a non-zero exit and no traceback, from
the real ``pagedserve`` command (each test runs it as a process)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from server_process import MAX_MODEL_LEN

pytestmark = pytest.mark.slow


def pagedserve(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pagedserve", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """The process failed with a message naming every needle, on one line, without a traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_port_in_use_is_reported_before_the_model_loads(tiny_model) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = pagedserve("serve", str(tiny_model()), "--port", str(port))
    assert_one_line_error(result, f"127.0.0.1:{port}", "--port")
    assert "engine ready" not in result.stderr and "weights" not in result.stderr, result.stderr


def test_folder_without_a_tokenizer(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model() / name, folder / name)
    assert_one_line_error(pagedserve("generate", "--model", str(folder), "hi"), "has no tokenizer")


def test_pickle_only_folder(tiny_model, tmp_path: Path) -> None:
    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_model(), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert_one_line_error(pagedserve("generate", "--model", str(folder), "hi"), "pytorch_model.bin", "safetensors")


def test_max_model_len_above_the_models(tiny_model) -> None:
    result = pagedserve("generate", "--model", str(tiny_model()), "--max-model-len", "4096", "hi")
    assert_one_line_error(result, "max_model_len=4096", "maximum context")


def test_unknown_plugin_name_in_the_allow_list() -> None:
    result = pagedserve("plugins", env={"PAGEDSERVE_PLUGINS": "nosuch"})
    assert_one_line_error(result, "PAGEDSERVE_PLUGINS", "nosuch")


def test_bench_serve_without_the_servers_api_key(server) -> None:
    result = pagedserve("bench", "serve", "--base-url", f"{server.url}/v1", "--num-prompts", "1",
                        "--max-model-len", str(MAX_MODEL_LEN), env={"OPENAI_API_KEY": ""})
    assert_one_line_error(result, "refused the API key", "--api-key")


def test_a_headless_node_does_not_take_the_http_port(tiny_model, monkeypatch) -> None:
    """``serve --headless`` runs tensor-parallel ranks and no server: a port held by something
    else (another server on the machine) is not its concern. It once refused to start, leaving
    node 0 waiting at the rendezvous."""
    from click.testing import CliRunner

    from pagedserve import cli
    from pagedserve.distributed import workers

    started = []
    monkeypatch.setattr(workers, "run_headless", lambda config: started.append(config.parallel.node_rank) or 0)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = CliRunner().invoke(cli.cli, [
            "serve", str(tiny_model()), "--port", str(port), "-tp", "2", "--nnodes", "2", "--node-rank", "1",
            "--master-port", "29400", "--headless",
        ])
    assert result.exit_code == 0, result.output
    assert started == [1]
