"""Shared fixtures: a tokenizer trained in the session and tiny random models built from it."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_tiny_model  # noqa: E402
from tiny_tokenizer import train_tokenizer  # noqa: E402

VOCAB_SIZE = 512


def pytest_configure(config: pytest.Config) -> None:
    """Split the cores between xdist's workers: each worker (and every server or CLI it starts,
    through ``OMP_NUM_THREADS``) gets ``cores // workers`` torch threads. With two workers of two
    OpenMP threads each on two cores, the threads spin against each other: a transformers
    ``generate`` in the tests took 6x longer than with one thread."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), VOCAB_SIZE)


ModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> ModelFactory:
    """``tiny_model(architecture="LlamaForCausalLM", **config_overrides) -> folder``, cached per
    configuration: a random transformers model saved as safetensors, with the session tokenizer."""
    built: dict[tuple, Path] = {}

    def make(architecture: str = "LlamaForCausalLM", **overrides: object) -> Path:
        key = (architecture, json.dumps(overrides, sort_keys=True))
        if key not in built:
            folder = tmp_path_factory.mktemp(architecture.lower())
            ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
            make_tiny_model(folder, architecture, vocab_size=VOCAB_SIZE, **{**ids, **overrides})
            for item in tokenizer_dir.iterdir():
                shutil.copy(item, folder / item.name)
            built[key] = folder
        return built[key]

    return make



@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tiny_model: ModelFactory, tmp_path_factory: pytest.TempPathFactory):
    """The shared ``pagedserve serve`` of this test process on the default tiny model (see
    ``server_process.shared_server``); a module that needs another server defines its own."""
    from server_process import shared_server

    return shared_server(request.config, tiny_model(), tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def client(server):
    """The official openai client on the shared server, without retries (a retry would hide an error)."""
    import openai
    from server_process import API_KEY

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
