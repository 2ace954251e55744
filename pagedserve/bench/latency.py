"""``pagedserve bench latency``: the time to generate a batch's outputs (batch 1 by default, as
``vllm bench latency``), and with ``--speculative-config`` the same batches without speculation
in the same run, for the speed-up and the mean accepted length.

Workloads: ``random`` (``--input-len`` random token ids, vLLM's), ``stdlib`` (the start of each
held-out standard-library file: the bundled models' held-out split) and ``stdlib-edit`` (a
held-out file's start, then an instruction to write it again with a change and the changed
first line: the code-editing case prompt lookup is made for).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from pagedserve.core.engine import LLMEngine
from pagedserve.core.sampling_params import SamplingParams

WORKLOADS = ("random", "stdlib", "stdlib-edit")
EDIT_INSTRUCTION = "\n\n# The same code again, with `self` renamed to `this`:\n"


def make_prompts(kind: str, engine: LLMEngine, count: int, input_len: int, output_len: int, seed: int) -> list[list[int]]:
    """``count`` prompts of at most ``input_len`` tokens, each leaving room for ``output_len``."""
    budget = min(input_len, engine.max_model_len - output_len)
    if budget < 1:
        raise ValueError(f"input_len + output_len exceed max_model_len={engine.max_model_len}")
    if kind == "random":
        rng = random.Random(seed)
        return [[rng.randrange(3, engine.vocab_size) for _ in range(budget)] for _ in range(count)]
    from pagedserve.assets.corpus import read_document, split_files

    encode = engine.tokenizer.encode
    prompts = []
    files = split_files()[1]
    for path in files:
        text = read_document(path)
        if kind == "stdlib":
            ids = encode(text)[:budget]
        else:
            instruction = encode(EDIT_INSTRUCTION, add_special_tokens=False)
            body = encode(text, add_special_tokens=False)[: (budget - len(instruction)) // 2 * 1]
            original = engine.tokenizer.decode(body)
            first_line = original.split("\n", 1)[0].replace("self", "this")
            ids = encode(original + EDIT_INSTRUCTION + first_line + "\n")[:budget]
        if len(ids) > 16:
            prompts.append(ids)
        if len(prompts) == count:
            break
    if len(prompts) < count:
        prompts = (prompts * (count // max(len(prompts), 1) + 1))[:count]
    return prompts


def run_latency(
    engines: dict[str, LLMEngine], prompts: list[list[int]], batch_size: int, output_len: int, iterations: int,
    warmup: int,
) -> dict[str, dict[str, Any]]:
    """Per engine: generate ``iterations`` batches of ``batch_size`` prompts (greedy, ignore_eos,
    exactly ``output_len`` tokens each) after ``warmup`` ones; the latencies, tokens/s and
    speculation counts. The engines take turns batch by batch (the same batch for each), so a
    change of the machine's load falls on all of them alike."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    counts = {name: [0, 0, 0] for name in engines}  # drafts, accepted, proposed
    for iteration in range(warmup + iterations):
        batch = [prompts[(iteration * batch_size + i) % len(prompts)] for i in range(batch_size)]
        for name, engine in engines.items():
            ids = [f"latency-{name}-{iteration}-{i}" for i in range(batch_size)]
            start = time.perf_counter()
            for request_id, prompt in zip(ids, batch):
                engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
            finished = []
            while engine.has_unfinished_requests():
                finished.extend(o for o in engine.step() if o.finished)
            if iteration < warmup:
                continue
            latencies[name].append(time.perf_counter() - start)
            for output in finished:
                counts[name][0] += output.metrics.get("spec_num_drafts", 0)
                counts[name][1] += output.metrics.get("spec_num_accepted_tokens", 0)
                counts[name][2] += output.metrics.get("spec_num_draft_tokens", 0)
    results = {}
    for name, times in latencies.items():
        result: dict[str, Any] = {
            "batch_size": batch_size,
            "avg_latency_s": statistics.mean(times),
            "output_tokens_per_s": batch_size * output_len * len(times) / sum(times),
        }
        drafts, accepted, proposed = counts[name]
        if drafts:
            result["mean_accepted_length"] = 1 + accepted / drafts
            result["acceptance_rate"] = accepted / proposed if proposed else 0.0
            result["num_drafts"] = drafts
        results[name] = result
    return results
