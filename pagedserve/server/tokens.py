"""``POST /tokenize`` and ``POST /detokenize`` (vLLM's), with the server's tokenizer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from pagedserve.server.chat import render_chat
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
        ids = render_chat(state, body.messages, body.add_generation_prompt, body.chat_template_kwargs)
    else:
        ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=state.max_model_len, tokens=ids)


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest, state: Annotated[ServerState, Depends(get_state)]
) -> DetokenizeResponse:
    state.check_model(body.model)
    if any(token >= state.vocab_size for token in body.tokens):
        raise ValueError(f"a token id is outside the vocabulary [0, {state.vocab_size})")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))
