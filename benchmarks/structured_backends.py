"""Compare the two grammar libraries pagedserve can build on: xgrammar and llguidance.

For a mid-size JSON schema (the kind an agent framework sends: nested objects, arrays, enums,
bounded strings and numbers) on the bundled model's tokenizer, it measures

* the compile time of the schema (cold, then from the library's cache where it has one), and
* the per-step mask time at batch 64: filling 64 matchers' token bitmasks and applying them to a
  [64, vocab] float32 logits tensor, averaged over the steps of a valid document.

Prints one table and writes JSON (machine, commit, figures) under benchmarks/results/. Run it as
``.venv/bin/python benchmarks/structured_backends.py``; it takes well under a minute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from pagedserve.assets import DEFAULT_MODEL, bundled_model_path
from pagedserve.bench.report import git_commit
from pagedserve.core.tokenizer import load_tokenizer

BATCH = 64
RESULTS = Path(__file__).parent / "results"

SCHEMA: dict[str, Any] = {
    "title": "Order",
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 60},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 5,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "notes": {"type": ["string", "null"], "maxLength": 80},
        "priority": {"type": "integer", "minimum": 0, "maximum": 5},
    },
    "required": ["order_id", "status", "customer", "items", "notes", "priority"],
    "additionalProperties": False,
}

DOCUMENT = {
    "order_id": "ABC-1234",
    "status": "shipped",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "vip": True},
    "items": [
        {"sku": "X-100", "quantity": 2, "price": 9.5},
        {"sku": "Y-7", "quantity": 1, "price": 120.0},
    ],
    "notes": None,
    "priority": 3,
}


def _variant(index: int) -> dict[str, Any]:
    """A schema different in its text (so no cache can answer it), alike in size."""
    schema = json.loads(json.dumps(SCHEMA))
    schema["title"] = f"Order{index}"
    schema["properties"]["priority"]["maximum"] = 5 + index
    return schema


def bench_xgrammar(tokenizer: Any, vocab_size: int, document_ids: list[int], runs: int) -> dict[str, float]:
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[tokenizer.eos_token_id])
    tokenizer_s = time.perf_counter() - start
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    cold = []
    for i in range(runs):
        start = time.perf_counter()
        compiler.compile_json_schema(json.dumps(_variant(i)), any_whitespace=False, separators=(",", ":"))
        cold.append(time.perf_counter() - start)
    text = json.dumps(_variant(0))
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
    cached_s = time.perf_counter() - start

    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    bitmask = xgr.allocate_token_bitmask(BATCH, vocab_size)
    logits = torch.randn(BATCH, vocab_size)
    fill, apply = [], []
    for token in document_ids:
        start = time.perf_counter()
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        middle = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        end = time.perf_counter()
        fill.append(middle - start)
        apply.append(end - middle)
        for matcher in matchers:
            if not matcher.accept_token(token):
                raise RuntimeError(f"xgrammar rejected token {token} of the valid document")
    return _figures(tokenizer_s, cold, cached_s, fill, apply)


def bench_llguidance(tokenizer: Any, vocab_size: int, document_ids: list[int], runs: int) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    start = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    tokenizer_s = time.perf_counter() - start
    options = {"whitespace_flexible": False}
    cold = []
    for i in range(runs):
        start = time.perf_counter()
        grammar = llguidance.grammar_from("json_schema", json.dumps({**_variant(i), "x-guidance": options}))
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        # llguidance builds lazily: the first mask finishes the work a compile does elsewhere.
        mask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        if matcher.is_error():
            raise RuntimeError(matcher.get_error())
        cold.append(time.perf_counter() - start)
    grammar = llguidance.grammar_from("json_schema", json.dumps({**_variant(0), "x-guidance": options}))
    start = time.perf_counter()
    llguidance.LLMatcher(ll_tokenizer, grammar)
    cached_s = time.perf_counter() - start

    matchers = [llguidance.LLMatcher(ll_tokenizer, grammar) for _ in range(BATCH)]
    executor = llguidance.LLExecutor(num_threads=1)
    bitmask = llguidance.torch.allocate_token_bitmask(BATCH, vocab_size)
    logits = torch.randn(BATCH, vocab_size)
    fill, apply = [], []
    for token in document_ids:
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        middle = time.perf_counter()
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        end = time.perf_counter()
        fill.append(middle - start)
        apply.append(end - middle)
        for matcher in matchers:
            if not matcher.consume_token(token):
                raise RuntimeError(f"llguidance rejected token {token}: {matcher.get_error()}")
    return _figures(tokenizer_s, cold, cached_s, fill, apply)


def _figures(tokenizer_s: float, cold: list[float], cached_s: float, fill: list[float], apply: list[float]) -> dict[str, float]:
    return {
        "tokenizer_setup_ms": tokenizer_s * 1e3,
        "compile_cold_ms": statistics.median(cold) * 1e3,
        "compile_again_ms": cached_s * 1e3,
        "mask_fill_ms_per_step": statistics.mean(fill) * 1e3,
        "mask_apply_ms_per_step": statistics.mean(apply) * 1e3,
        "mask_ms_per_step": (statistics.mean(fill) + statistics.mean(apply)) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="cold compiles of distinct schemas (median)")
    parser.add_argument("--output", type=Path, default=RESULTS / "structured-backends-cpu-tiny-py.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = bundled_model_path(DEFAULT_MODEL)
    tokenizer = load_tokenizer(str(model))
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    document_ids = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    results = {
        "xgrammar": {"version": version("xgrammar"), **bench_xgrammar(tokenizer, vocab_size, document_ids, args.runs)},
        "llguidance": {"version": version("llguidance"), **bench_llguidance(tokenizer, vocab_size, document_ids, args.runs)},
    }
    names = list(next(iter(results.values())))
    print(f"{'':24}" + "".join(f"{lib:>14}" for lib in results))
    for name in names:
        cells = "".join(f"{results[lib][name]:>14.3f}" if isinstance(results[lib][name], float) else f"{results[lib][name]:>14}" for lib in results)
        print(f"{name:24}{cells}")
    record = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": 1},
        "commit": git_commit() or "unknown",
        "model": DEFAULT_MODEL,
        "vocab_size": vocab_size,
        "batch": BATCH,
        "document_tokens": len(document_ids),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
