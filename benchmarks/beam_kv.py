"""KV blocks held by beam search's W beams against W independent copies of the same sequences.

For each beam width, a beam search over a prompt of several blocks runs on the engine; after
every step the blocks the live beams hold (distinct block ids: shared prompt and common-prefix
blocks count once) are compared with what W separate requests of the same tokens would hold
(each its own blocks, nothing shared). The table shows the mean and peak of both and their ratio.

    python benchmarks/beam_kv.py [--model PATH] [--prompt-len 256] [--max-tokens 64]
        [--widths 2,4,8] [--out benchmarks/results/beam-kv-cpu.json]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from pagedserve.bench.report import format_table, write_result
from pagedserve.cli import default_model
from pagedserve.core.beam_search import BeamSearchParams
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine


def measure(engine: LLMEngine, prompt: list[int], width: int, max_tokens: int) -> dict[str, Any]:
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, ignore_eos=True)
    request_id = f"beam-{width}"
    engine.add_beam_search_request(request_id, {"prompt_token_ids": prompt}, params)
    beams = engine._groups[request_id].sequences
    shared, separate = [], []
    while engine.has_unfinished_requests():
        engine.step()
        live = [b for b in beams if not b.is_finished and b.block_ids]
        if len(live) == width:  # every beam has its blocks (after the prompt, before the end)
            shared.append(len({block for b in live for block in b.block_ids}))
            separate.append(sum(engine.kv_cache.blocks_needed(b.num_tokens) for b in live))
    assert engine.kv_cache.num_used_blocks == 0
    return {
        "beam_width": width,
        "mean_blocks_shared": statistics.mean(shared),
        "mean_blocks_separate": statistics.mean(separate),
        "peak_blocks_shared": max(shared),
        "peak_blocks_separate": max(separate),
        "mean_ratio": statistics.mean(s / p for s, p in zip(shared, separate)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--widths", default="2,4,8")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = args.model or default_model()
    engine = LLMEngine(engine_config_from_args(model, block_size=args.block_size))
    prompt = [(7 * i) % (engine.vocab_size - 10) + 5 for i in range(args.prompt_len)]
    rows: list[tuple[str, Any]] = []
    results: dict[str, Any] = {}
    for width in (int(w) for w in args.widths.split(",")):
        result = measure(engine, prompt, width, args.max_tokens)
        results[f"width_{width}"] = result
        rows += [(f"W={width} {name}", value) for name, value in result.items() if name != "beam_width"]
    print(format_table(rows))
    if args.out:
        settings = {"model": model, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                    "block_size": args.block_size}
        print(f"wrote {write_result(args.out, 'beam_kv', settings, results, str(engine.runner.device))}")


if __name__ == "__main__":
    main()
