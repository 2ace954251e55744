"""From a request's ``StructuredOutputsParams`` to an xgrammar ``Grammar``, with errors that say
what is wrong with the schema or grammar (a ValueError, which the server answers with a 400).

Building the ``Grammar`` parses and checks the schema, regex or grammar; it is quick and happens
when the request is added. Compiling it against the tokenizer (the slow part) happens later, off
the engine loop (``processor.py``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import xgrammar as xgr

from pagedserve.core.sampling_params import StructuredOutputsParams

#: xgrammar's messages start with a time and a C++ source location: not for users.
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


def grammar_key(params: StructuredOutputsParams) -> tuple[str, str]:
    """The cache key of a constraint: its kind and its text as given (the order of a schema's
    properties is the order of the output's, so it is part of the key)."""
    kind = params.kind
    if kind == "json":
        return kind, json.dumps(params.json)
    if kind == "choice":
        return kind, json.dumps(params.choice)
    if kind == "json_object":
        return kind, ""
    return kind, getattr(params, kind)


def _clean(exc: Exception) -> str:
    lines = [_CPP_PREFIX.sub("", line).strip() for line in str(exc).strip().splitlines()]
    return " ".join(line for line in lines if line)


def choice_ebnf(choices: list[str]) -> str:
    """``root ::= "a" | "b"``: one of the strings, exactly (JSON string escapes are EBNF's)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def is_lark(grammar: str) -> bool:
    """vLLM's rule of thumb: EBNF (GBNF) rules are written ``name ::= ...``, Lark's ``name: ...``."""
    return "::=" not in grammar


def build_grammar(kind: str, text: str) -> Any:
    """The xgrammar ``Grammar`` of a constraint; ValueError naming the field when it is invalid.

    JSON is compact (no free whitespace, ``", "`` and ``": "`` separators) and strict (no
    properties or items the schema does not name): a small model free to add whitespace can fill
    ``max_tokens`` with newlines."""
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        if kind == "json_object":
            return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(json.loads(text)))
        if kind == "grammar":
            return xgr.Grammar.from_lark(text) if is_lark(text) else xgr.Grammar.from_ebnf(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        what = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind]
        raise ValueError(f"structured_outputs.{kind}: invalid {what}: {_clean(exc)}") from None
    raise ValueError(f"unknown structured_outputs kind {kind!r}")
