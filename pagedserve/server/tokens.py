"""``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` (vLLM's), with the
server's tokenizer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from transformers import PreTrainedTokenizerBase

from pagedserve.server.chat import render_chat_request
from pagedserve.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from pagedserve.server.serving import ServerState, get_state

router = APIRouter()


@router.post("/tokenize")
async def tokenize(
    body: TokenizeCompletionRequest | TokenizeChatRequest, state: Annotated[ServerState, Depends(get_state)]
) -> TokenizeResponse:
    """A prompt as the completions API tokenizes it, or messages as the chat API renders them."""
    state.check_model(body.model)
    if isinstance(body, TokenizeChatRequest):
        ids = await render_chat_request(state, body)
    else:
        ids = await state.tokenizers.run(_encode, body.prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids)


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest, state: Annotated[ServerState, Depends(get_state)]
) -> DetokenizeResponse:
    state.check_model(body.model)
    if any(token >= state.vocab_size for token in body.tokens):
        raise ValueError(f"a token id is outside the vocabulary [0, {state.vocab_size})")
    return DetokenizeResponse(prompt=await state.tokenizers.run(_decode, body.tokens))


def _json_safe(value: Any) -> Any:
    """Tokenizer init kwargs as JSON: AddedToken and other objects become their text."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


_FILE_FIELDS = ("vocab_file", "merges_file", "tokenizer_file")


@router.get("/tokenizer_info")
async def tokenizer_info(state: Annotated[ServerState, Depends(get_state)]) -> dict[str, Any]:
    """The tokenizer's configuration (its tokenizer_config.json as loaded), as vLLM answers:
    the init kwargs without file paths, ``tokenizer_class`` and the chat template."""
    tokenizer = state.tokenizer
    info = {k: v for k, v in tokenizer.init_kwargs.items() if k not in _FILE_FIELDS}
    info = _json_safe(info)
    info["tokenizer_class"] = type(tokenizer).__name__
    if tokenizer.chat_template:
        info["chat_template"] = tokenizer.chat_template
    return info
