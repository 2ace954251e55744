"""The server application in-process on the bundled model (its tokenizer adds BOS): request
preparation runs off the event loop, request bodies over the limit get a 413, an empty prompt
is a 400 (not a generation from BOS alone), a request's own chat template needs the server's
trust, and the OpenAPI document lists the statuses the server sends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from pagedserve.assets import DEFAULT_MODEL
from pagedserve.core.async_engine import AsyncLLMEngine
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.metrics import EngineMetrics
from pagedserve.server.app import create_app
from pagedserve.server.limits import ServerLimits

pytestmark = pytest.mark.slow

BODY_LIMIT = 4096
HELD = "HOLD-THIS-REQUEST"
CHAT = [{"role": "user", "content": HELD}]


def client_for(limits: ServerLimits) -> TestClient:
    config = engine_config_from_args(DEFAULT_MODEL, dtype="float32", max_model_len=128, num_kv_blocks=32)
    metrics = EngineMetrics("tiny")
    return TestClient(create_app(AsyncLLMEngine(config, observers=[metrics]), metrics.registry, limits=limits))


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with client_for(ServerLimits(max_request_body_bytes=BODY_LIMIT)) as client:
        yield client


class Hold:
    """Makes the tokenizer calls whose first argument ``matches`` wait until ``/health`` has
    answered (or 30 s: the guard against a stalled loop, which never lets it answer)."""

    def __init__(self, matches: Callable[[object], bool]) -> None:
        self.matches = matches
        self.started = threading.Event()
        self.health_answered = threading.Event()
        self.saw_health: bool | None = None
        self.threads: list[str] = []

    def hold(self, first: object) -> None:
        if self.matches(first):
            self.threads.append(threading.current_thread().name)
            self.started.set()
            self.saw_health = self.health_answered.wait(30)

    def patch(self, monkeypatch: pytest.MonkeyPatch, tokenizer_class: type) -> None:
        for name in ("encode", "decode", "apply_chat_template"):
            original = getattr(tokenizer_class, name)

            def held(tokenizer, first, *args, _original=original, **kwargs):
                self.hold(first)
                return _original(tokenizer, first, *args, **kwargs)

            monkeypatch.setattr(tokenizer_class, name, held)

    def check(self, client: TestClient, path: str, body: dict) -> None:
        """Post the held request; /health answers meanwhile; then it completes, on a pool thread."""
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(client.post, path, json=body)
            assert self.started.wait(30)
            assert client.get("/health").status_code == 200
            self.health_answered.set()
            assert held.result(timeout=60).status_code == 200
        assert self.saw_health is True, "the held request blocked the event loop: /health waited for it"
        assert all(name.startswith("pagedserve-tokenizer") for name in self.threads), self.threads


HELD_REQUESTS = {
    "completion": ("/v1/completions", {"prompt": HELD, "max_tokens": 1}),
    "chat": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}),
    "tokenize a prompt": ("/tokenize", {"prompt": HELD}),
    "tokenize messages": ("/tokenize", {"messages": CHAT}),
}


def tokenizer_class(client: TestClient) -> type:
    return type(client.app.state.server.tokenizer)


@pytest.mark.parametrize(("path", "body"), HELD_REQUESTS.values(), ids=HELD_REQUESTS.keys())
def test_tokenizing_and_templating_leave_the_event_loop_free(client, monkeypatch, path, body) -> None:
    hold = Hold(lambda first: HELD in str(first))
    hold.patch(monkeypatch, tokenizer_class(client))
    hold.check(client, path, body)


def test_detokenizing_leaves_the_event_loop_free(client, monkeypatch) -> None:
    ids = client.post("/tokenize", json={"prompt": HELD}).json()["tokens"]
    hold = Hold(lambda first: first == ids)
    hold.patch(monkeypatch, tokenizer_class(client))
    hold.check(client, "/detokenize", {"tokens": ids})


def error_of(response, status: int, message: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and message in error["message"], error
    return error


def test_bodies_over_the_limit_get_a_413(client) -> None:
    big = {"prompt": "x" * BODY_LIMIT}
    error_of(client.post("/v1/completions", json=big), 413, "--max-request-body-bytes")
    error_of(client.post("/tokenize", json=big), 413, f"limit of {BODY_LIMIT} bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        yield b'{"prompt": "'
        for _ in range(BODY_LIMIT // 256 + 1):
            yield b"x" * 256
        yield b'"}'

    error_of(client.post("/v1/completions", content=chunks()), 413, "--max-request-body-bytes")
    under = client.post("/tokenize", json={"prompt": "x" * (BODY_LIMIT - 100)})
    assert under.status_code == 200
    assert client.get("/health").status_code == 200


def test_an_empty_prompt_is_refused_though_the_tokenizer_adds_bos(client) -> None:
    assert client.post("/tokenize", json={"prompt": ""}).json()["tokens"]  # BOS alone
    error_of(client.post("/v1/completions", json={"prompt": ""}), 400, "the prompt is empty")
    error_of(client.post("/v1/completions", json={"prompt": ["def f():", ""]}), 400, "empty")


def test_a_trusting_server_renders_the_request_template() -> None:
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    with client_for(ServerLimits(trust_request_chat_template=True)) as trusting:
        body = {"messages": [{"role": "user", "content": "hi"}], "chat_template": template}
        tokens = trusting.post("/tokenize", json=body).json()["tokens"]
        assert trusting.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "<user>hi"
        error_of(
            trusting.post("/tokenize", json={**body, "chat_template_kwargs": {"tokenize": True}}),
            400,
            "cannot set tokenize",
        )


def test_server_limits_are_checked() -> None:
    assert ServerLimits().seqs_per_request(64) == 32
    assert ServerLimits(max_num_seqs_per_request=64).seqs_per_request(64) == 64
    with pytest.raises(ValueError, match=r"max_num_seqs_per_request \(65\) is more than max_num_seqs"):
        ServerLimits(max_num_seqs_per_request=65).seqs_per_request(64)
    for bad in ({"max_request_body_bytes": 0}, {"timeout_header_read": -1}, {"max_num_seqs_per_request": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerLimits(**bad)
