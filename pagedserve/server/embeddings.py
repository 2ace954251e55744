"""``POST /v1/embeddings``: the served model's pooled last hidden state, one engine request per
input (pooled as the server's ``--pooler-config`` says), batched with the generation requests
in the same steps. ``encoding_format`` float or base64 (little-endian float32, as OpenAI
sends it and the SDK asks for by default)."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from transformers import PreTrainedTokenizerBase

from pagedserve.core.pooling import PoolingParams
from pagedserve.server.errors import APIError
from pagedserve.server.protocol import RequestModel, TokenId
from pagedserve.server.serving import ServerState, collect_unless_disconnected, get_state

router = APIRouter()


class EmbeddingRequest(RequestModel):
    model: str | None = None
    input: str | list[str] | list[TokenId] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM's extras
    normalize: bool | None = None
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


def _encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool
) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in texts]


async def _inputs(body: EmbeddingRequest, state: ServerState) -> list[list[int]]:
    """Each input's token ids; text is encoded off the event loop."""
    given = body.input
    if isinstance(given, str):
        given = [given]
    if not given:
        raise APIError(400, "input is empty: give a string, a list of strings or token ids", param="input")
    if isinstance(given[0], int):
        return [given]  # type: ignore[list-item]
    if isinstance(given[0], list):
        return given  # type: ignore[return-value]
    if not all(given):
        raise APIError(400, "an input string is empty", param="input")
    return await state.tokenizers.run(_encode_texts, given, body.add_special_tokens)


def _encode(embedding: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(embedding, dtype="<f4").tobytes()).decode()
    return embedding


@router.post("/v1/embeddings", response_model=None)
async def create_embedding(
    body: EmbeddingRequest, request: Request, state: Annotated[ServerState, Depends(get_state)]
) -> EmbeddingResponse | Response:
    state.check_model(body.model)
    if body.truncate_prompt_tokens is not None:
        raise APIError(400, "truncate_prompt_tokens is not supported", param="truncate_prompt_tokens")
    prompts = await _inputs(body, state)
    for ids in prompts:
        state.check_length(len(ids), None)
    try:
        params = PoolingParams(normalize=body.normalize, dimensions=body.dimensions)
    except ValueError as exc:
        raise APIError(400, str(exc), param="dimensions") from exc
    request_id = f"embd-{uuid.uuid4().hex}"
    stream = await state.add(request_id, [{"prompt_token_ids": ids} for ids in prompts], params)
    outputs = await collect_unless_disconnected(request, stream)
    if isinstance(outputs, Response):
        return outputs
    num_tokens = sum(len(ids) for ids in prompts)
    return EmbeddingResponse(
        id=request_id,
        model=state.model_name,
        data=[
            EmbeddingData(index=i, embedding=_encode(output.outputs.embedding, body.encoding_format))
            for i, output in enumerate(outputs)
        ],
        usage=EmbeddingUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
    )
