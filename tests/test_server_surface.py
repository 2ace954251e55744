"""The small routes of the OpenAI / vLLM surface on the shared test server: one model by id,
``/ping``, ``/tokenizer_info``, OpenAI-shaped 404/405 naming the route, ``X-Request-Id`` on every
response and in the access log, and no CORS headers by default."""

from __future__ import annotations

from pathlib import Path

import httpx2
import openai
import pytest
from server_process import API_KEY
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model()


def error_of(response: httpx2.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


def test_a_model_by_id(client, server, model_dir) -> None:
    (listed,) = client.models.list().data
    card = client.models.retrieve(listed.id)  # a folder path: the id holds slashes
    assert card.id == listed.id == str(model_dir) and card.object == "model"
    assert card.model_extra["max_model_len"] == listed.model_extra["max_model_len"]
    with pytest.raises(openai.NotFoundError, match="`nope` does not exist"):
        client.models.retrieve("nope")
    error_of(httpx2.get(f"{server.url}/v1/models/{listed.id}"), 401)  # behind the key like /v1/models


def test_ping_as_sagemaker_and_vllm_and_head_probes(server) -> None:
    for method in ("GET", "POST"):
        assert httpx2.request(method, f"{server.url}/ping").status_code == 200
    for path in ("/health", "/metrics"):  # aiperf probes /metrics with HEAD
        assert httpx2.head(f"{server.url}{path}").status_code == 200


def test_tokenizer_info_is_the_tokenizer_config(server, model_dir) -> None:
    info = httpx2.get(f"{server.url}/tokenizer_info").json()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert info["tokenizer_class"] == type(tokenizer).__name__
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template
    assert not {"vocab_file", "merges_file", "tokenizer_file"} & set(info)


@pytest.mark.parametrize(
    ("method", "path", "status", "words"),
    [
        ("GET", "/v1/nothing", 404, "GET /v1/nothing is not a route"),
        ("POST", "/v2/chat/completions", 404, "POST /v2/chat/completions is not a route"),
        ("GET", "/v1/completions", 405, "GET /v1/completions; /v1/completions allows POST"),
        ("DELETE", "/health", 405, "DELETE /health; /health allows"),
    ],
)
def test_unknown_routes_and_methods_answer_openai_errors_naming_them(server, method, path, status, words) -> None:
    error = error_of(httpx2.request(method, f"{server.url}{path}", headers=AUTH), status)
    assert words in error["message"]


def test_every_response_carries_a_request_id(server) -> None:
    mine = httpx2.get(f"{server.url}/health", headers={"X-Request-Id": "my-id-1"})
    assert mine.headers["X-Request-Id"] == "my-id-1"
    ids = set()
    for response in (
        httpx2.get(f"{server.url}/health"),
        httpx2.get(f"{server.url}/v1/nothing"),  # an error too
        httpx2.get(f"{server.url}/v1/models"),  # 401 without the key
        httpx2.post(f"{server.url}/v1/completions", headers=AUTH, json={"prompt": "x", "max_tokens": 1}),
    ):
        assert len(response.headers["X-Request-Id"]) == 32
        ids.add(response.headers["X-Request-Id"])
    assert len(ids) == 4
    assert "my-id-1" in server.log.read_text()  # in the access log line


def test_no_cors_headers_unless_asked_for(server) -> None:
    origin = {"Origin": "https://elsewhere.example"}
    plain = httpx2.get(f"{server.url}/health", headers=origin)
    assert "access-control-allow-origin" not in plain.headers
    preflight = httpx2.options(
        f"{server.url}/v1/models", headers={**origin, "Access-Control-Request-Method": "GET"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_when_origins_are_given() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from pagedserve.server.middleware import CORSOptions, install_middleware

    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": []})
    install_middleware(app, CORSOptions(["https://app.example"], ["GET"], ["Authorization"], True))
    client = TestClient(app)
    allowed = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    preflight = client.options("/v1/models", headers=allowed)
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert preflight.headers["X-Request-Id"]
    other = client.options("/v1/models", headers={**allowed, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    response = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert response.headers["access-control-expose-headers"] == "X-Request-Id"
    with pytest.raises(ValueError, match="name the origins"):
        CORSOptions(["*"], allow_credentials=True)
