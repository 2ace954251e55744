"""Distil the bundled draft from the bundled target: train ``pagedserve/tiny-py-draft`` (starting
from its weights) on ``pagedserve/tiny-py``'s next-token distributions over the training split
of the corpus, so that it agrees with the target rather than with the text.

    python scripts/distill_draft.py --out /tmp/tiny-py-draft-distilled --max-minutes 10

Loss: the cross-entropy of the draft against the target's softmax (forward KL, temperature 1),
every position of random training windows; AdamW, bf16 autocast over fp32 weights, a fixed seed.
It stops after ``--steps`` steps or ``--max-minutes``, whichever comes first, then reports the
greedy agreement with the target on held-out windows (before and after) and writes the draft
(fp16 safetensors, the target's tokenizer files) to ``--out``. Measure its acceptance with
``pagedserve bench latency --workload stdlib --speculative-config '{"method": "draft_model",
"model": OUT, "num_speculative_tokens": 4}'``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagedserve.assets import DEFAULT_MODEL, DRAFT_MODEL, bundled_model_path  # noqa: E402
from pagedserve.assets.corpus import eval_windows, split_files, token_stream  # noqa: E402

SEED = 0
CONTEXT = 256


@torch.no_grad()
def agreement(draft, target, windows: list[list[int]]) -> float:
    same = total = 0
    for window in windows:
        ids = torch.tensor([window])
        same += (draft(input_ids=ids).logits.argmax(-1) == target(input_ids=ids).logits.argmax(-1)).sum().item()
        total += len(window)
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--max-minutes", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-windows", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)

    target_dir, draft_dir = bundled_model_path(DEFAULT_MODEL), bundled_model_path(DRAFT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    train_files, held_out = split_files()
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = torch.tensor(token_stream(encode, train_files, bos, eos))
    windows = eval_windows(token_stream(encode, held_out, bos, eos), CONTEXT)[: args.eval_windows]
    before = agreement(draft.eval(), target, windows)
    print(f"held-out greedy agreement before: {before:.4f}", flush=True)

    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(CONTEXT)
    draft.train()
    start = time.perf_counter()
    step = 0
    while step < args.steps and time.perf_counter() - start < args.max_minutes * 60:
        starts = torch.randint(0, len(stream) - CONTEXT, (args.batch_size, 1), generator=generator)
        batch = stream[starts + offsets].long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                soft = torch.softmax(target(input_ids=batch).logits.float(), dim=-1)
            log_q = torch.log_softmax(draft(input_ids=batch).logits.float(), dim=-1)
        loss = -(soft * log_q).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            print(f"step {step:5d} soft cross-entropy {loss.item():.4f} {time.perf_counter() - start:6.0f}s", flush=True)
        step += 1
    draft.eval()
    after = agreement(draft, target, windows)
    print(f"held-out greedy agreement after {step} steps: {after:.4f}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    draft.to(torch.float16).save_pretrained(args.out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        if (draft_dir / name).is_file():
            shutil.copy(draft_dir / name, args.out / name)
    report = {"steps": step, "wall_s": round(time.perf_counter() - start, 1), "batch_size": args.batch_size,
              "context": CONTEXT, "learning_rate": args.learning_rate, "seed": SEED,
              "held_out_greedy_agreement_before": round(before, 4), "held_out_greedy_agreement_after": round(after, 4)}
    (args.out / "distillation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
