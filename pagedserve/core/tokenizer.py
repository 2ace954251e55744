"""Tokenizer side of the engine: loading, EOS ids, chat templates, and incremental
detokenization with stop strings.

Loading and templating are transformers'; incremental decoding is ``tokenizers``'
``DecodeStream``, which holds back tokens until they form whole UTF-8 characters.
"""

from __future__ import annotations

import inspect
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from pagedserve.core.sampling_params import SamplingParams

#: Files of which a local folder needs at least one to hold a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str, revision: str | None = None, model_config: Any = None) -> PreTrainedTokenizerBase:
    """A fast transformers tokenizer from a local folder or a hub id (never remote code).

    ``model_config``: the model's config, read from the folder ``path`` already. AutoTokenizer
    is given it instead of reading the config again through transformers' config classes (a
    second of start-up) when the folder's ``tokenizer_config.json`` names its tokenizer class, the
    case where AutoTokenizer only reads the config's ``model_type`` and name."""
    if os.path.isdir(path) and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{path} has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)}); "
            "point the tokenizer option at a folder or hub id that has one"
        )
    given = {"config": model_config} if model_config is not None and _names_its_class(path) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=False, **given)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {path!r}: {exc}") from exc
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(
            f"the tokenizer of {path!r} ({type(tokenizer).__name__}) has no fast (Rust) backend, "
            "which incremental detokenization needs"
        )
    return tokenizer


def load_model_tokenizer(model_config: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a ``ModelConfig`` whose ``model_path`` and ``hf_config`` are resolved:
    its ``tokenizer`` option's, or the model folder's (given the config read already)."""
    own = model_config.tokenizer in (None, model_config.model_path)
    return load_tokenizer(
        model_config.tokenizer or model_config.model_path, model_config.revision,
        model_config.hf_config if own else None,
    )


def _names_its_class(path: str) -> bool:
    """Whether the folder's ``tokenizer_config.json`` names a tokenizer class (and no remote code)."""
    try:
        settings = json.loads((Path(path) / "tokenizer_config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(settings, dict) and isinstance(settings.get("tokenizer_class"), str) and "auto_map" not in settings


def get_eos_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config: dict[str, Any]
) -> tuple[int, ...]:
    """The generation config's ``eos_token_id`` (an int or a list) then the tokenizer's, once each."""
    configured = generation_config.get("eos_token_id")
    if configured is None:
        configured = []
    elif isinstance(configured, int):
        configured = [configured]
    ids = [*configured]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))


def bad_words_token_ids(tokenizer: PreTrainedTokenizerBase, words: list[str], vocab_size: int) -> list[list[int]]:
    """Each of vLLM's ``bad_words`` as token sequences, found as vLLM finds them: the word
    without its leading spaces, then with one leading space when that tokenizes differently
    into as many tokens. ValueError for a token the model does not have."""
    sequences: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    for ids in sequences:
        for token in ids:
            if token >= vocab_size:
                raise ValueError(f"bad_words has token id {token}, outside the vocabulary [0, {vocab_size})")
    return sequences


def _message_text(message: dict[str, Any]) -> dict[str, Any]:
    """The message with list-of-parts content joined into one string (text parts only)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"message content part of type {kind!r} is not supported; only 'text'")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}


@cache
def rendering_arguments() -> frozenset[str]:
    """The names template variables may not take: the arguments of transformers' rendering
    (``apply_chat_template`` and ``render_jinja_template``) and the ``messages`` it passes."""
    names = {"messages"}
    for function in (PreTrainedTokenizerBase.apply_chat_template, render_jinja_template):
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) and name != "self":
                names.add(name)
    return frozenset(names)


def check_template_variables(variables: dict[str, Any]) -> None:
    """ValueError when extra template variables would set a rendering argument (``tokenize``,
    ``add_generation_prompt``, ``chat_template``, ...) rather than a variable of the template."""
    taken = sorted(set(variables) & rendering_arguments())
    if taken:
        raise ValueError(
            f"chat_template_kwargs cannot set {', '.join(taken)}: "
            f"{'these are arguments' if len(taken) > 1 else 'it is an argument'} of the template "
            "rendering, not template variables"
        )


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render ``messages`` (and ``tools``' schemas) with the tokenizer's chat template (or
    ``chat_template``) and tokenize the result. ``chat_template_kwargs`` are extra template
    variables; one that names a rendering argument is a ValueError, so they can never change
    how rendering is done.

    The template places the special tokens itself, so none are added when tokenizing."""
    variables = dict(chat_template_kwargs or {})
    check_template_variables(variables)
    if not (chat_template or tokenizer.chat_template):
        raise ValueError(
            "this model's tokenizer has no chat template; use the completions API with a plain "
            "prompt, or a model (or tokenizer) that ships a chat template"
        )
    text = tokenizer.apply_chat_template(
        [_message_text(m) for m in messages],
        tools=tools,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
        **variables,
    )
    return tokenizer.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """One sequence's output text, decoded token by token, with stop-string detection.

    The stream is primed with the prompt ids, so the first output token decodes as it would
    after the prompt (for SentencePiece-style tokenizers its leading space is kept, where
    ``tokenizer.decode(output_ids)`` strips it; byte-level BPE decodes the same either way).
    Tokens that end inside a multi-byte character are held back until it completes; an
    incomplete character left when generation ends is dropped, never emitted broken.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._detokenize = params.detokenize
        self._stream = None
        if params.detokenize:
            self._stream = DecodeStream(
                ids=list(prompt_token_ids), skip_special_tokens=params.skip_special_tokens
            )
        # vLLM's fast-tokenizer rule: without spaces between special tokens, a special token
        # right after another is its bare content (no space the decoder may put before it).
        self._added_tokens: dict[int, str] = {}
        if not (params.skip_special_tokens or params.spaces_between_special_tokens):
            self._added_tokens = {
                token_id: added.content for token_id, added in tokenizer.added_tokens_decoder.items()
            }
        self._last_added = False
        self._stops: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._text = ""
        self._end: int | None = None  # where the output text ends, once finished
        self._sent = 0
        self.output_token_ids: list[int] = []
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """The output text so far; after a stop string, cut before it (or after it when
        ``include_stop_str_in_output``)."""
        return self._text if self._end is None else self._text[: self._end]

    @property
    def finished(self) -> bool:
        return self._end is not None

    def update(self, new_token_ids: list[int], stop_terminated: bool = False) -> str | None:
        """Append tokens and return the stop string they completed, if any.

        ``stop_terminated``: the last token is a stop token id or EOS, which ends the output
        and, unless ``include_stop_str_in_output``, is not part of its text (as in vLLM)."""
        if self.finished:
            raise RuntimeError("update() after the output finished")
        self.output_token_ids.extend(new_token_ids)
        to_decode = new_token_ids
        if stop_terminated and not self._include_stop:
            to_decode = new_token_ids[:-1]
        start = len(self._text)
        for token in to_decode if self._detokenize else ():
            piece = self._stream.step(self._backend, token)
            if self._added_tokens:
                added = self._added_tokens.get(token)
                if added is not None and self._last_added:
                    piece = added
                self._last_added = added is not None
            if piece:
                self._text += piece
        match = self._find_stop(start)
        if match is not None:
            self.stop_string, index = match
            self._end = index + len(self.stop_string) if self._include_stop else index
        elif stop_terminated:
            self._end = len(self._text)
        return self.stop_string

    def _find_stop(self, new_text_start: int) -> tuple[str, int] | None:
        """The earliest stop string ending in the new text (searched with a tail before it)."""
        if not self._stops or new_text_start == len(self._text):
            return None
        search_from = max(0, new_text_start - (self._longest_stop - 1))
        found: tuple[str, int] | None = None
        for stop in self._stops:
            index = self._text.find(stop, search_from)
            if index != -1 and (found is None or index < found[1]):
                found = (stop, index)
        return found

    def _held_back(self) -> int:
        """Length of the longest end of the text that could be the start of a stop string."""
        for length in range(min(self._longest_stop - 1, len(self._text)), 0, -1):
            tail = self._text[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def get_delta(self) -> str:
        """The text not returned before, for streaming. While unfinished it holds back an end
        that may yet become a stop string, so a stop string never leaks out in pieces."""
        end = self._end if self._end is not None else len(self._text) - self._held_back()
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def flush(self) -> str:
        """The output ended (length, EOS, abort): release everything held back."""
        if self._end is None:
            self._end = len(self._text)
        return self.get_delta()

    def decode_token(self, token_id: int) -> str:
        """One token's own text, for logprob dicts (special tokens included)."""
        return self._backend.decode([token_id], skip_special_tokens=False)
