"""What a JSON schema costs: 64 concurrent constrained requests against the same 64 unconstrained,
in one run on the bundled model, and the time to first token of a schema never seen before.

* throughput: output tokens per second of ``LLM.generate`` over 64 prompts, every request
  exactly ``--max-tokens`` long (``ignore_eos``, so both sides compute the same tokens; a
  constrained request whose JSON is complete may then only repeat EOS, still masked each step).
  Unconstrained and constrained runs alternate after an unmeasured warm-up; each side's best
  run is compared (the machine's noise only ever slows a run down). Target: >= 0.85.
* cold-schema TTFT: one request into an idle engine with a schema of new text (its grammar is
  compiled while it waits), against the same request with the schema compiled before (cached)
  and without any schema; medians over ``--ttft-runs`` distinct schemas.

Prints one table and writes JSON (machine, commit, figures) under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from pagedserve import LLM, SamplingParams, StructuredOutputsParams
from pagedserve.assets import DEFAULT_MODEL
from pagedserve.bench.report import git_commit

RESULTS = Path(__file__).parent / "results"
NUM_REQUESTS = 64

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 100000},
        "title": {"type": "string", "maxLength": 40},
        "status": {"enum": ["open", "closed", "draft"]},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 24}, "admin": {"type": "boolean"}},
            "required": ["name", "admin"],
        },
        "labels": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "score": {"type": "number"},
    },
    "required": ["id", "title", "status", "owner", "labels", "score"],
}


def _prompts() -> list[str]:
    starts = ["def ", "class ", "import ", "# ", "return ", "for ", "with ", "if "]
    return [f"{starts[i % len(starts)]}item_{i}(" for i in range(NUM_REQUESTS)]


def _throughput(llm: LLM, prompts: list[str], params: SamplingParams) -> float:
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return sum(len(c.token_ids) for o in outputs for c in o.outputs) / seconds


def _ttft(llm: LLM, prompt: str, params: SamplingParams) -> float:
    (output,) = llm.generate(prompt, params.clone(max_tokens=1), use_tqdm=False)
    return output.metrics["first_token_time"] - output.metrics["arrival_time"]


def _schema(index: int) -> dict[str, Any]:
    schema = json.loads(json.dumps(SCHEMA))
    schema["properties"]["id"]["maximum"] = 100000 + index  # new text: nothing cached
    return schema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="measured runs of each side")
    parser.add_argument("--ttft-runs", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, default=RESULTS / "structured-throughput-cpu-tiny-py.json")
    args = parser.parse_args()

    llm = LLM(DEFAULT_MODEL, dtype=args.dtype, max_model_len=512, max_num_seqs=NUM_REQUESTS)
    prompts = _prompts()
    plain = SamplingParams(temperature=0.8, seed=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = plain.clone(structured_outputs=StructuredOutputsParams(json=SCHEMA))
    _throughput(llm, prompts, plain)  # warm-up, and the schema compiled once
    _throughput(llm, prompts, constrained)
    runs: dict[str, list[float]] = {"unconstrained": [], "json_schema": []}
    for _ in range(args.rounds):
        runs["unconstrained"].append(_throughput(llm, prompts, plain))
        runs["json_schema"].append(_throughput(llm, prompts, constrained))
    best = {name: max(values) for name, values in runs.items()}
    ratio = best["json_schema"] / best["unconstrained"]

    ttft: dict[str, list[float]] = {"unconstrained": [], "cached_schema": [], "cold_schema": []}
    for i in range(args.ttft_runs):
        cold = plain.clone(structured_outputs=StructuredOutputsParams(json=_schema(i + 1)))
        ttft["unconstrained"].append(_ttft(llm, prompts[0], plain))
        ttft["cold_schema"].append(_ttft(llm, prompts[0], cold))
        ttft["cached_schema"].append(_ttft(llm, prompts[0], cold))  # the same text: now cached
    ttft_ms = {name: statistics.median(values) * 1e3 for name, values in ttft.items()}

    print(f"{'':34}{'tokens/s':>12}")
    for name, value in best.items():
        print(f"{name + ' (best of ' + str(args.rounds) + ')':34}{value:>12.1f}")
    print(f"{'json_schema / unconstrained':34}{ratio:>12.3f}   (target >= 0.85)")
    print(f"\n{'time to first token, ms (median)':34}")
    for name, value in ttft_ms.items():
        print(f"{name:34}{value:>12.1f}")
    record = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads()},
        "commit": git_commit() or "unknown",
        "model": DEFAULT_MODEL,
        "dtype": args.dtype,
        "num_requests": NUM_REQUESTS,
        "max_tokens": args.max_tokens,
        "tokens_per_second_runs": runs,
        "tokens_per_second_best": best,
        "constrained_over_unconstrained": ratio,
        "ttft_ms_median": ttft_ms,
        "ttft_runs_s": ttft,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
