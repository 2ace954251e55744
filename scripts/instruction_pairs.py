"""Instruction pairs made from the corpus itself: a function's docstring, phrased as a request,
and the function's source as the answer.

Used by ``train_tiny_model.py`` (the pairs from the training files are mixed into the target's
batches, in the bundled chat template) and by ``eval_tiny_model.py`` (the held-out files' pairs are
the prompts whose answers are checked with ``ast.parse``). Stdlib only.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

from pagedserve.assets.corpus import read_document

#: Functions longer than this many lines (docstring included) are left out: a small model's
#: context is 512 tokens, and the point is short, complete answers.
MAX_LINES = 40
#: Irregular third persons of verbs that open docstrings ("Do X" -> "does X").
_THIRD_PERSON = {"do": "does", "go": "goes", "be": "is", "have": "has"}


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    summary: str  # the docstring's first sentence
    header: str  # the ``def`` line(s) up to and including the colon
    preamble: str  # the header and the docstring: a completion prompt
    source: str  # the whole function, dedented


def _summary(docstring: str) -> str:
    first = docstring.strip().split("\n\n")[0]
    sentence = " ".join(first.split())
    return sentence.split(". ")[0].rstrip(".")


def _third_person(word: str) -> str:
    lower = word.lower()
    if lower in _THIRD_PERSON:
        return _THIRD_PERSON[lower]
    if lower.endswith("s") and not lower.endswith("ss"):
        return lower
    if lower.endswith(("ss", "sh", "ch", "x", "o")):
        return lower + "es"
    if lower.endswith("y") and lower[-2:-1] not in tuple("aeiou"):
        return lower[:-1] + "ies"
    return lower + "s"


def request(pair: Pair, style: int) -> str:
    """The user's message for a pair, in one of three phrasings (``style`` 0-2)."""
    first, _, rest = pair.summary.partition(" ")
    clause = f"{_third_person(first)} {rest}".strip() if first.isalpha() and first[:1].isupper() else pair.summary
    if style == 0:
        return f"Write a function that {clause}."
    if style == 1:
        return f"Write a Python function `{pair.name}` that {clause}."
    return pair.summary + "."


def pairs_from_file(path: Path) -> Iterator[Pair]:
    text = read_document(path)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        docstring = ast.get_docstring(node)
        segment = ast.get_source_segment(text, node, padded=True)
        if not docstring or not segment or node.end_lineno - node.lineno + 1 > MAX_LINES:
            continue
        summary = _summary(docstring)
        if len(summary) < 12 or len(node.body) < 2:  # a docstring-only function answers nothing
            continue
        source = textwrap.dedent(segment)
        header_lines = node.body[0].lineno - node.lineno
        lines = source.splitlines()
        header = "\n".join(lines[:header_lines])
        preamble = "\n".join(lines[: node.body[0].end_lineno - node.lineno + 1])
        if not header.rstrip().endswith(":"):
            continue
        yield Pair(node.name, summary, header, preamble, source.rstrip() + "\n")


def corpus_pairs(paths: Sequence[Path]) -> list[Pair]:
    return [pair for path in paths for pair in pairs_from_file(path)]


def held_out_prompts(paths: Sequence[Path], count: int, seed: int = 0) -> list[Pair]:
    """``count`` pairs drawn from the held-out files at a fixed seed, at most three per file."""
    per_file: list[Pair] = []
    for path in paths:
        per_file += list(pairs_from_file(path))[:3]
    return random.Random(seed).sample(per_file, min(count, len(per_file)))
