"""Measure what the bundled model's card claims about its output, through pagedserve itself.

    python scripts/eval_tiny_model.py [--model pagedserve/tiny-py] [--sweep] [--out eval.json]

The prompts are 50 functions with docstrings from the held-out files (``instruction_pairs``,
a fixed seed), asked two ways:

- completion: the function's ``def`` line and docstring; the completion is cut where the
  function ends (the first non-blank line back at column 0) and the whole is given to
  ``ast.parse``;
- chat: "Write a function that <docstring summary>." in the chat template; the answer, as it
  comes, is given to ``ast.parse``.

An answer counts as parsing when ``ast.parse`` accepts it and it defines a function (a run of
``#`` lines parses, and answers nothing).

For each sampling setting it reports the share of answers that parse and the share of outputs
(completions uncut) that repeat a line three times in a row, and of chat answers that end
by themselves (EOS) before the token limit: a loop within a line (``name, name, name, ...``)
repeats no line but runs to the limit. The settings are greedy and the
model's ``generation_config.json`` defaults; ``--sweep`` adds the candidates the defaults were
chosen from. Sampled requests have per-request seeds, so every figure is reproducible.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from instruction_pairs import Pair, held_out_prompts, request  # noqa: E402

from pagedserve.assets.corpus import split_files  # noqa: E402

PROMPTS = 50
COMPLETION_TOKENS = 256
CHAT_TOKENS = 320
#: Candidate defaults (temperature, top_p, repetition_penalty) for ``--sweep``.
SWEEP = (
    (0.8, 0.95, 1.0),
    (0.7, 0.9, 1.1),
    (0.5, 0.9, 1.2),
    (0.3, 0.9, 1.2),
    (0.5, 0.9, 1.3),
)


def function_end(text: str) -> str:
    """``text`` up to the first non-blank line, after the first, that starts at column 0."""
    lines = text.split("\n")
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:i])
    return text


def parses(text: str) -> bool:
    """Whether ``text`` parses and defines a function (a run of comments parses too)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(tree))


def repeats_a_line(text: str, times: int = 3) -> bool:
    """Whether some non-blank line comes ``times`` times in a row (blank lines between ignored)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return any(len(set(lines[i : i + times])) == 1 for i in range(len(lines) - times + 1))


def measure(llm, pairs: list[Pair], setting: dict) -> dict:
    from pagedserve import SamplingParams

    def params(i: int, max_tokens: int) -> SamplingParams:
        seed = {"seed": i} if setting.get("temperature", 0.0) > 0 else {}
        return SamplingParams(max_tokens=max_tokens, **setting, **seed)

    start = time.perf_counter()
    completions = llm.generate([p.preamble for p in pairs],
                               [params(i, COMPLETION_TOKENS) for i in range(len(pairs))], use_tqdm=False)
    completion_texts = [o.outputs[0].text for o in completions]
    chats = llm.chat([[{"role": "user", "content": request(p, 0)}] for p in pairs],
                     [params(i, CHAT_TOKENS) for i in range(len(pairs))], use_tqdm=False)
    chat_texts = [o.outputs[0].text for o in chats]
    completion_ok = [parses(function_end(p.preamble + t)) for p, t in zip(pairs, completion_texts)]
    chat_ok = [parses(t) for t in chat_texts]
    looping = [repeats_a_line(t) for t in completion_texts]
    chat_looping = [repeats_a_line(t) for t in chat_texts]
    return {
        "setting": setting or {"temperature": 0.0},
        "completion_parses": sum(completion_ok) / len(pairs),
        "chat_parses": sum(chat_ok) / len(pairs),
        "completion_repeats_a_line_3x": sum(looping) / len(pairs),
        "chat_repeats_a_line_3x": sum(chat_looping) / len(pairs),
        "chat_ends_by_itself": sum(o.outputs[0].finish_reason == "stop" for o in chats) / len(pairs),
        "wall_s": round(time.perf_counter() - start, 1),
        "examples": {"completion": pairs[0].preamble + completion_texts[0],
                     "chat": {"user": request(pairs[0], 0), "assistant": chat_texts[0]}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pagedserve/tiny-py")
    parser.add_argument("--sweep", action="store_true", help="also measure the candidate defaults")
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import torch

    from pagedserve import LLM

    torch.set_num_threads(1)
    llm = LLM(args.model)
    defaults = {k: llm.engine.generation_config[k] for k in ("temperature", "top_p", "repetition_penalty")
                if k in llm.engine.generation_config}
    pairs = held_out_prompts(split_files()[1], args.prompts)
    settings = [{"temperature": 0.0}]
    if defaults:
        settings.append(defaults)
    if args.sweep:
        candidates = [{"temperature": t, "top_p": p, "repetition_penalty": r} for t, p, r in SWEEP]
        settings += [c for c in candidates if c != defaults]
    results = []
    for setting in settings:
        result = measure(llm, pairs, setting)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)
    report = {"model": args.model, "prompts": len(pairs), "completion_tokens": COMPLETION_TOKENS,
              "chat_tokens": CHAT_TOKENS, "generation_config_defaults": defaults, "results": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
