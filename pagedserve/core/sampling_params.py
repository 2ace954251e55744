"""SamplingParams: vLLM's names and meanings, validated with errors that name the field."""

from __future__ import annotations

import json
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Temperatures below this are greedy decoding.
GREEDY_EPSILON = 1e-5
MAX_LOGPROBS = 20
#: Sampling fields a model's generation_config.json may give defaults for (as vLLM applies them).
GENERATION_CONFIG_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """The sampling defaults a model's generation_config.json gives (the fields above it sets)."""
    return {name: generation_config[name] for name in GENERATION_CONFIG_FIELDS if name in generation_config}


def _check_range(name: str, value: float, low: float, high: float, text: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be {text}, got {value!r}")


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class RequestOutputKind(enum.IntEnum):
    """What each ``RequestOutput`` of a request holds (vLLM's ``RequestOutputKind``)."""

    #: Every output holds all the tokens and text so far (copied each step).
    CUMULATIVE = 0
    #: Each output holds only what is new since the previous one: O(new tokens) a step.
    DELTA = 1
    #: One output, when the request finished.
    FINAL_ONLY = 2


#: A per-request logits processor, vLLM's offline form: ``fn(output_token_ids, logits)`` or
#: ``fn(prompt_token_ids, output_token_ids, logits)`` returning the row's (changed) logits.
LogitsProcessorFn = Callable[..., Any]


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar (vLLM's ``StructuredOutputsParams``): exactly one of
    ``json`` (a JSON schema, as a dict or its text), ``regex``, ``choice`` (one of these strings),
    ``grammar`` (EBNF / GBNF, or Lark) or ``json_object`` (any JSON object).

    The grammar backend (a logits-processor plugin) checks the schema or grammar itself when the
    request is added: an invalid one is a ValueError then. ``disable_any_whitespace``,
    ``disable_additional_properties`` and ``disable_fallback`` are accepted for vLLM's clients;
    they describe what pagedserve does anyway (compact JSON, no properties the schema does not
    name, one backend and so no fallback).
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            what = ", ".join(given) if given else "none"
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar or "
                f"json_object; got {what}"
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object), got {self.json!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not self.choice:
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must hold non-empty strings only")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint this is: ``json``, ``regex``, ``choice``, ``grammar`` or ``json_object``."""
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        return "json_object"


@dataclass
class SamplingParams:
    """How to sample one request's completions (see vLLM's ``SamplingParams``)."""

    n: int = 1
    #: Sequences sampled; the ``n`` with the highest cumulative logprob are returned (>= n).
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    #: Constrain the output to a JSON schema, regex, choice or grammar (a grammar-backend plugin).
    structured_outputs: StructuredOutputsParams | None = None
    spaces_between_special_tokens: bool = True
    #: False: no text at all (token ids only); stop strings then cannot be used.
    detokenize: bool = True
    #: Words never generated: each is banned as a token sequence, with and without a leading
    #: space, once the tokens before its last one have been generated.
    bad_words: list[str] | None = None
    #: Only these token ids may be sampled.
    allowed_token_ids: list[int] | None = None
    #: Keep only the last k prompt tokens (-1: the last max_model_len).
    truncate_prompt_tokens: int | None = None
    #: Per-request callables on the request's logits row (offline only; see LogitsProcessorFn).
    logits_processors: list[LogitsProcessorFn] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    #: Options for third-party logits processors, keyed by whatever they document.
    extra_args: dict[str, Any] | None = None
    #: Filled by the engine: the model's EOS ids (from generation_config / tokenizer).
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)
    #: Filled by the engine from ``bad_words``: the token sequences to ban.
    bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        _check_range("temperature", self.temperature, 0.0, float("inf"), ">= 0")
        _check_range("top_p", self.top_p, 0.0, 1.0, "in (0, 1]")
        if self.top_p <= 0.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        _check_range("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "in [-2, 2]")
        _check_range("repetition_penalty", self.repetition_penalty, 1e-9, 1e9, "> 0")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must map token ids to biases")
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    token = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
                _check_range(f"logit_bias[{key}]", value, -100.0, 100.0, "in [-100, 100]")
                bias[token] = float(value)
            self.logit_bias = bias
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for token in self.stop_token_ids:
            _check_int("stop_token_ids[]", token, 0)
        _check_int("max_tokens", self.max_tokens, 1, allow_none=True)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS
            ):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise ValueError("extra_args must be a dict")
        self._check_vllm_extras()

    def _check_vllm_extras(self) -> None:
        """The fields beyond OpenAI's: best_of, token filters, output shape, prompt truncation."""
        if self.best_of is not None:
            _check_int("best_of", self.best_of, 1)
            if self.best_of < self.n:
                raise ValueError(f"best_of must be at least n ({self.n}), got {self.best_of}")
        for name in ("skip_special_tokens", "spaces_between_special_tokens", "detokenize"):
            _check_bool(name, getattr(self, name))
        if not self.detokenize and self.stop:
            raise ValueError("detokenize=False cannot be used with stop strings: set detokenize=True")
        if self.bad_words is not None:
            words = [self.bad_words] if isinstance(self.bad_words, str) else self.bad_words
            if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
                raise ValueError("bad_words must be a list of non-empty strings")
            self.bad_words = list(words)
        if self.allowed_token_ids is not None:
            if not isinstance(self.allowed_token_ids, list) or not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be a non-empty list of token ids")
            for token in self.allowed_token_ids:
                _check_int("allowed_token_ids[]", token, 0)
        if self.truncate_prompt_tokens is not None:
            value = self.truncate_prompt_tokens
            if not isinstance(value, int) or isinstance(value, bool) or not (value >= 1 or value == -1):
                raise ValueError(f"truncate_prompt_tokens must be -1 or an integer >= 1, got {value!r}")
        if self.logits_processors is not None:
            if not isinstance(self.logits_processors, (list, tuple)) or not all(
                callable(f) for f in self.logits_processors
            ):
                raise ValueError("logits_processors must be a list of callables")
            self.logits_processors = list(self.logits_processors)
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ValueError(
                f"output_kind must be a RequestOutputKind (0, 1 or 2), got {self.output_kind!r}"
            ) from None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def num_sequences(self) -> int:
        """Sequences the engine runs for this request: ``best_of`` when given, else ``n``."""
        return self.best_of if self.best_of is not None else self.n

    def clone(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        values["stop"] = list(values["stop"] or [])
        return SamplingParams(**values)
