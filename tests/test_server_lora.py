"""LoRA adapters through a real ``pagedserve serve`` process and the ``openai`` SDK: adapters as
models (``/v1/models`` with their parent), ``model=<adapter>`` equal to the offline LLM with that
LoRARequest, 404 for an unknown name, runtime load/unload under ``--lora-root`` only, a 400 for a
bad adapter while a request streams on, and the ``lora_requests_info`` gauge."""

from __future__ import annotations

import json
import shutil
import sys
import threading

import httpx2
import openai
import pytest
from click.testing import CliRunner
from server_process import API_KEY, ENGINE_ARGS, Server, free_port, start_server

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.cli import cli

from lora_helpers import edit_adapter_config, make_peft_adapter

pytestmark = pytest.mark.slow

LORA_ARGS = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory) -> dict:
    model_dir = tiny_model()
    fixed = tmp_path_factory.mktemp("fixed")
    root = tmp_path_factory.mktemp("lora-root")
    adapters = {
        "a": make_peft_adapter(model_dir, fixed / "a", seed=11, r=4, scale=0.3),
        "b": make_peft_adapter(model_dir, fixed / "b", seed=12, r=8, scale=0.3, target_modules=["q_proj", "v_proj"]),
        "c": make_peft_adapter(model_dir, root / "c", seed=13, r=4, scale=0.3),
    }
    bad = root / "bad"
    shutil.copytree(adapters["c"], bad)
    edit_adapter_config(bad, modules_to_save=["lm_head"])
    return {"model": model_dir, "root": root, "bad": bad, **adapters}


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory) -> Server:
    b_json = json.dumps({"name": "b", "path": str(setup["b"]), "base_model_name": str(setup["model"])})
    command = [sys.executable, "-m", "pagedserve", "serve", str(setup["model"])]
    server = start_server(
        command, tmp_path_factory.mktemp("log") / "server.log", free_port(), "--api-key", API_KEY,
        "--enable-lora", "--max-loras=2", "--max-lora-rank=8",
        "--enable-lora-runtime-updating", "--lora-root", str(setup["root"]),
        "--lora-modules", f"a={setup['a']}", b_json,
    )
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(setup) -> LLM:
    return LLM(str(setup["model"]), **ENGINE_ARGS, **LORA_ARGS)


def offline(llm: LLM, setup: dict, name: str | None, prompt: str) -> str:
    lora = None if name is None else LoRARequest(name, ord(name), str(setup[name]))
    params = SamplingParams(temperature=0.0, max_tokens=12)
    return llm.generate([prompt], params, lora_request=lora, use_tqdm=False)[0].outputs[0].text


def post(server: Server, route: str, body: dict) -> httpx2.Response:
    return httpx2.post(f"{server.url}{route}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def test_models_lists_the_adapters_with_their_parent(client, setup) -> None:
    cards = {m.id: m for m in client.models.list().data}
    base = str(setup["model"])
    assert set(cards) == {base, "a", "b"}
    assert cards["a"].parent == base and cards["b"].parent == base and cards[base].parent is None
    assert cards["a"].root == str(setup["a"])
    retrieved = client.models.retrieve("a")  # GET /v1/models/{id} knows adapters too
    assert retrieved.id == "a" and retrieved.parent == base and retrieved.root == str(setup["a"])


def test_model_name_selects_the_adapter(client, llm, setup) -> None:
    prompt = "def fibonacci(n):"
    texts = {}
    for name in (None, "a", "b"):
        model = name or str(setup["model"])
        completion = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0.0)
        assert completion.model == model
        texts[name] = completion.choices[0].text
        assert texts[name] == offline(llm, setup, name, prompt)
    assert len(set(texts.values())) == 3  # the adapters change the output
    chat = client.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0
    )
    assert chat.model == "a"


def test_an_unknown_model_is_a_404(client) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)


def test_runtime_load_and_unload_under_the_lora_root(server, client, llm, setup, tmp_path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(setup["c"], outside)
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(outside)})
    assert response.status_code == 400 and "--lora-root" in response.json()["error"]["message"]
    escape = str(setup["root"] / ".." / outside.parent.name / "outside")
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": escape}).status_code == 400

    # A bad adapter is a 400 while a streaming request goes on undisturbed.
    prompt = "import os\nimport sys\n"
    chunks: list[str] = []
    started = threading.Event()

    def stream() -> None:
        for chunk in client.completions.create(model="a", prompt=prompt, max_tokens=12, temperature=0.0, stream=True):
            chunks.append(chunk.choices[0].text if chunk.choices else "")
            started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    started.wait(30)
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(setup["bad"])})
    assert response.status_code == 400
    assert "modules_to_save" in response.json()["error"]["message"]
    thread.join(60)
    assert "".join(chunks) == offline(llm, setup, "a", prompt)

    response = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(setup["c"])})
    assert response.status_code == 200, response.text
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(setup["c"])}).status_code == 400
    assert "c" in {m.id for m in client.models.list().data}
    completion = client.completions.create(model="c", prompt="x = 1", max_tokens=12, temperature=0.0)
    assert completion.choices[0].text == offline(llm, setup, "c", "x = 1")

    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="x", max_tokens=2)


def test_lora_requests_info_gauge(server, client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="b", prompt="x", max_tokens=2)
    text = httpx2.get(f"{server.url}/metrics").text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "pagedserve:lora_requests_info"]
    (sample,) = family.samples
    assert sample.labels["max_lora"] == "2"
    assert sample.value > 1e9  # a timestamp
    assert set(sample.labels) >= {"running_lora_adapters", "waiting_lora_adapters"}


def test_lora_flags_are_checked(setup) -> None:
    runner = CliRunner()
    # Port 0: serve binds its port first, and 8000 may be taken by anything else on the machine.
    model, port = str(setup["model"]), ["--port", "0"]
    result = runner.invoke(cli, ["serve", model, *port, "--lora-modules", f"a={setup['a']}"])
    assert result.exit_code != 0 and "need --enable-lora" in result.output
    result = runner.invoke(cli, ["serve", model, *port, "--enable-lora", "--enable-lora-runtime-updating"])
    assert result.exit_code != 0 and "needs --lora-root" in result.output
    result = runner.invoke(cli, ["serve", model, *port, "--enable-lora", "--lora-modules", "no-equals-sign"])
    assert result.exit_code != 0 and "name=path" in result.output
