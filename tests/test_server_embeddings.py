"""``/v1/embeddings`` on the shared test server through the openai SDK (float and base64, one
input or many, text or token ids) against the offline ``LLM.embed`` of the same engine flags."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx2
import numpy as np
import openai
import pytest
import torch
from server_process import API_KEY, ENGINE_ARGS

from pagedserve import LLM

pytestmark = pytest.mark.slow

TEXTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Config:"]


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model()


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> list[list[float]]:
    llm = LLM(str(model_dir), **ENGINE_ARGS)
    return [o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)]


def close(got: list[float], want: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_embeddings_equal_offline_embed(client, model_dir, offline, encoding_format) -> None:
    # The SDK asks for base64 when no format is given and decodes it; "float" comes as JSON.
    kwargs = {"encoding_format": "float"} if encoding_format == "float" else {}
    response = client.embeddings.create(model=str(model_dir), input=TEXTS, **kwargs)
    assert [d.index for d in response.data] == [0, 1, 2] and response.object == "list"
    for data, want in zip(response.data, offline):
        close(data.embedding, want)
    tokens = sum(len(client_tokens(client, text)) for text in TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    (one,) = client.embeddings.create(model=str(model_dir), input=TEXTS[0], **kwargs).data
    close(one.embedding, offline[0])


def client_tokens(client: openai.OpenAI, text: str) -> list[int]:
    base = str(client.base_url).removesuffix("/v1/")
    return httpx2.post(f"{base}/tokenize", json={"prompt": text}).json()["tokens"]


def test_token_id_inputs_and_raw_base64(client, server, model_dir, offline) -> None:
    ids = [client_tokens(client, t) for t in TEXTS[:2]]
    response = client.embeddings.create(model=str(model_dir), input=ids, encoding_format="float")
    for data, want in zip(response.data, offline):
        close(data.embedding, want)
    raw = httpx2.post(
        f"{server.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"input": ids[0], "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4").tolist()
    close(decoded, offline[0])


def test_normalize_false_is_the_raw_pooled_state(client, model_dir, offline) -> None:
    (data,) = client.embeddings.create(
        model=str(model_dir), input=TEXTS[0], encoding_format="float", extra_body={"normalize": False}
    ).data
    raw = torch.tensor(data.embedding)
    assert abs(raw.norm().item() - 1.0) > 1e-3
    close(torch.nn.functional.normalize(raw, dim=-1).tolist(), offline[0])


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"dimensions": 3}, "matryoshka"),
        ({"input": []}, "input is empty"),
        ({"input": [""]}, "empty"),
        ({"input": [10**9]}, "vocabulary"),
        ({"extra_body": {"truncate_prompt_tokens": 4}}, "not supported"),
        ({"encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_embedding_requests_are_400(client, model_dir, fields, words) -> None:
    with pytest.raises(openai.BadRequestError, match=words):
        client.embeddings.create(**{"model": str(model_dir), "input": "x", "encoding_format": "float", **fields})
