"""The forward of one CPU decode step, eager against compiled (``compilation_config`` level 3),
interleaved in one process so their ratio shares the machine's load (issue 22 item 2).

A step here is what the runner does for a decode-only batch: the padded inputs written into the
persistent buffers, the attention metadata built, the model forward, and the logits of the real
rows. Every request sits at context ``--context``. Sampling, scheduling and detokenization are
not included (the engine's share, measured by the peer benchmark).

Every engine is built first (a compiled one compiles every size: its time is reported, and is
much lower on a second run that finds inductor's on-disk caches), then all are timed. With ``--lock FILE`` the timed
part waits for an exclusive ``flock`` on FILE, so compiles can run while another benchmark holds
it and only the timing is serialised.

Usage: python benchmarks/cpu_decode_step.py MODEL [--dtype float32,bfloat16] [--batch 1,64]
       [--context 256] [--steps 20] [--rounds 3] [--lock /work/wt/bench.lock] [--output-json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator

import torch

from pagedserve import LLM
from pagedserve.core.cuda_graphs import PaddedDecode


def decode_step(padded: PaddedDecode, model: torch.nn.Module, batch: int, size: int, context: int) -> torch.Tensor:
    """One decode step of ``batch`` requests at ``context`` tokens each, padded to ``size``."""
    block_size = padded.buffers.block_size
    blocks = [list(range(i * (context // block_size + 1), (i + 1) * (context // block_size + 1))) for i in range(batch)]
    return model.compute_logits(padded.run([3] * batch, [context] * batch, blocks, size))


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lock", default=None)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    results = []
    engines = {}
    for dtype in args.dtype.split(","):
        common = dict(dtype=dtype, cuda_graph_sizes=batches, max_num_seqs=max(batches),
                      num_kv_blocks=max(batches) * (args.context // 16 + 2), max_model_len=args.context + 16)
        eager = LLM(args.model, **common)
        start = time.perf_counter()
        compiled = LLM(args.model, compilation_config=3, **common)
        compile_seconds = time.perf_counter() - start
        engines[dtype] = ({"eager": eager.engine.runner, "compiled": compiled.engine.runner}, compile_seconds)
    with locked(args.lock), torch.inference_mode():
        for dtype, (runners, compile_seconds) in engines.items():
            load = os.getloadavg()
            for batch in batches:
                for runner in runners.values():  # warm: the first steps of a size pay a set-up
                    for _ in range(3):
                        decode_step(runner.padded_decode, runner.model, batch, batch, args.context)
                best = {name: float("inf") for name in runners}
                for _ in range(args.rounds):
                    for name, runner in runners.items():
                        start = time.perf_counter()
                        for _ in range(args.steps):
                            decode_step(runner.padded_decode, runner.model, batch, batch, args.context)
                        best[name] = min(best[name], (time.perf_counter() - start) / args.steps)
                row = {
                    "model": os.path.basename(args.model.rstrip("/")), "dtype": dtype, "batch": batch,
                    "context": args.context, "eager_ms": best["eager"] * 1e3, "compiled_ms": best["compiled"] * 1e3,
                    "speedup": best["eager"] / best["compiled"],
                    "eager_tok_s": batch / best["eager"], "compiled_tok_s": batch / best["compiled"],
                    "compile_s_all_sizes": compile_seconds, "loadavg_1m": load[0], "threads": torch.get_num_threads(),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
