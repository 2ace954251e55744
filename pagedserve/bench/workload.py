"""Benchmark workloads: prompts of random token ids with input/output lengths from a named
distribution, reproducible from a seed.

Distributions (``--lengths``):

- ``fixed:IN,OUT``: every request has IN prompt tokens and OUT output tokens;
- ``uniform:A-B,C-D``: input uniform in [A, B], output uniform in [C, D];
- ``sharegpt``: a log-normal mix shaped like ShareGPT conversations (a median of about 1.5 times
  as many input as output tokens, a long tail), clipped to the model's context. Not the data set
  itself (none can be downloaded here), but the same shape of lengths.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int

    @property
    def total_len(self) -> int:
        return len(self.prompt_token_ids) + self.output_len


def _parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def length_pairs(spec: str, count: int, max_model_len: int, rng: random.Random) -> list[tuple[int, int]]:
    """``count`` (input, output) lengths from the distribution ``spec``, each fitting the context."""
    kind, _, args = spec.partition(":")
    if kind == "fixed":
        inp, out = (int(x) for x in args.split(","))
        pairs = [(inp, out)] * count
    elif kind == "uniform":
        (a, b), (c, d) = (_parse_range(x) for x in args.split(","))
        pairs = [(rng.randint(a, b), rng.randint(c, d)) for _ in range(count)]
    elif kind == "sharegpt":
        scale = max_model_len / 8  # medians of about 1/8 and 1/12 of the context
        pairs = []
        for _ in range(count):
            inp = max(4, int(rng.lognormvariate(math.log(scale), 0.8)))
            out = max(4, int(rng.lognormvariate(math.log(scale / 1.5), 0.7)))
            pairs.append((inp, out))
    else:
        raise ValueError(f"unknown length distribution {spec!r}: use fixed:IN,OUT, uniform:A-B,C-D or sharegpt")
    fitted = []
    for inp, out in pairs:
        if inp < 1 or out < 1:
            raise ValueError(f"lengths must be positive, got input {inp}, output {out}")
        inp = min(inp, max_model_len - 1)
        fitted.append((inp, min(out, max_model_len - inp)))
    return fitted


def make_workload(
    spec: str, count: int, vocab_size: int, max_model_len: int, seed: int = 0, special_ids: int = 3
) -> list[BenchRequest]:
    """Requests of random token ids (above the first ``special_ids`` ids) with lengths from ``spec``."""
    rng = random.Random(seed)
    return [
        BenchRequest([rng.randrange(special_ids, vocab_size) for _ in range(inp)], out)
        for inp, out in length_pairs(spec, count, max_model_len, rng)
    ]


def with_fresh_ids(workload: list[BenchRequest], seed: int, vocab_size: int, special_ids: int = 3) -> list[BenchRequest]:
    """The same lengths with other random ids: a repeat of the workload that the prefix cache
    cannot skip."""
    rng = random.Random(seed)
    return [
        BenchRequest([rng.randrange(special_ids, vocab_size) for _ in request.prompt_token_ids], request.output_len)
        for request in workload
    ]
