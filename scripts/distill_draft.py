"""Distil the bundled draft from the bundled target: train ``pagedserve/tiny-py-draft`` on
``pagedserve/tiny-py``'s next-token distributions, so that it agrees with the target rather than
with the text.

    python scripts/distill_draft.py --out /tmp/draft --layers 1 --steps 600

Data: half of every batch is random windows of the corpus's training split; the other half is
the target's own continuations (``--generated`` of them, through pagedserve: alternately greedy
and sampled at temperature 0.8, each from a 64-token window of the training split at a seeded
offset), because what a draft is asked to predict at serving time is what the target writes,
not the corpus. Loss: the cross-entropy of the draft against the target's softmax (forward KL,
temperature 1) at every position; AdamW, bf16 autocast over fp32 weights, cosine decay, a fixed
seed. The draft starts from ``--init`` (default: the bundled draft), keeping its first
``--layers`` layers. Reports the greedy agreement with the target on held-out windows (before
and after) and writes the draft (fp16 safetensors, the target's tokenizer files,
``distillation.json``) to ``--out``. Measure its acceptance with ``pagedserve bench latency
--workload stdlib --speculative-config '{"method": "draft_model", "model": OUT,
"num_speculative_tokens": 4}'``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pagedserve.assets import DEFAULT_MODEL, DRAFT_MODEL, bundled_model_path  # noqa: E402
from pagedserve.assets.corpus import eval_windows, split_files, token_stream  # noqa: E402

SEED = 0
CONTEXT = 256
PROMPT_TOKENS = 64
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@torch.no_grad()
def agreement(draft, target, windows: list[list[int]]) -> float:
    same = total = 0
    for window in windows:
        ids = torch.tensor([window])
        same += (draft(input_ids=ids).logits.argmax(-1) == target(input_ids=ids).logits.argmax(-1)).sum().item()
        total += len(window)
    return same / total


def keep_layers(model, layers: int):
    """The model with only its first ``layers`` decoder layers (the others dropped)."""
    if layers > model.config.num_hidden_layers:
        raise SystemExit(f"--layers {layers}: the initial draft has only {model.config.num_hidden_layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def target_continuations(target_dir: Path, stream: torch.Tensor, count: int) -> list[list[int]]:
    """``count`` sequences of ``CONTEXT`` tokens: a training window's first ``PROMPT_TOKENS`` and
    the target's continuation (even ones greedy, odd ones sampled at temperature 0.8)."""
    from pagedserve import LLM, SamplingParams

    generator = torch.Generator().manual_seed(SEED + 1)
    starts = torch.randint(0, len(stream) - PROMPT_TOKENS, (count,), generator=generator).tolist()
    prompts = [{"prompt_token_ids": stream[s : s + PROMPT_TOKENS].tolist()} for s in starts]
    new = CONTEXT - PROMPT_TOKENS
    params = [SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0) if i % 2 == 0 else
              SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.8, seed=i) for i in range(count)]
    llm = LLM(str(target_dir), max_num_seqs=64)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [p["prompt_token_ids"] + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=Path, default=bundled_model_path(DEFAULT_MODEL))
    parser.add_argument("--init", type=Path, default=bundled_model_path(DRAFT_MODEL), help="the initial draft")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the initial draft to keep")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="stop early after this long")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--generated", type=int, default=256, help="target continuations to train on")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = keep_layers(AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32), args.layers)
    train_files, held_out = split_files()
    encode = lambda text: tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = torch.tensor(token_stream(encode, train_files, bos, eos))
    windows = eval_windows(token_stream(encode, held_out, bos, eos), CONTEXT)[: args.eval_windows]
    before = agreement(draft.eval(), target, windows)
    print(f"held-out greedy agreement before: {before:.4f}", flush=True)
    start = time.perf_counter()
    generated = torch.tensor(target_continuations(args.target, stream, args.generated)) if args.generated else None
    generation_s = time.perf_counter() - start
    print(f"{args.generated} target continuations in {generation_s:.0f}s", flush=True)

    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    )
    generator = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(CONTEXT)
    corpus_rows = args.batch_size // 2 if generated is not None else args.batch_size
    draft.train()
    start = time.perf_counter()
    step = 0
    while step < args.steps and time.perf_counter() - start < args.max_minutes * 60:
        starts = torch.randint(0, len(stream) - CONTEXT, (corpus_rows, 1), generator=generator)
        batch = stream[starts + offsets].long()
        if generated is not None:
            rows = torch.randint(0, len(generated), (args.batch_size - corpus_rows,), generator=generator)
            batch = torch.cat([batch, generated[rows].long()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                soft = torch.softmax(target(input_ids=batch).logits.float(), dim=-1)
            log_q = torch.log_softmax(draft(input_ids=batch).logits.float(), dim=-1)
        loss = -(soft * log_q).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            print(f"step {step:5d} soft cross-entropy {loss.item():.4f} {time.perf_counter() - start:6.0f}s", flush=True)
        step += 1
    wall_s = time.perf_counter() - start
    draft.eval()
    after = agreement(draft, target, windows)
    print(f"held-out greedy agreement after {step} steps: {after:.4f}", flush=True)

    shutil.rmtree(args.out, ignore_errors=True)
    draft.to(torch.float16).save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.target / name).is_file():
            shutil.copy(args.target / name, args.out / name)
    report = {
        "command": "python scripts/distill_draft.py " + " ".join(sys.argv[1:]),
        "target_sha256": __import__("hashlib").sha256((args.target / "model.safetensors").read_bytes()).hexdigest(),
        "layers": args.layers, "steps": step, "planned_steps": args.steps, "wall_s": round(wall_s, 1),
        "generation_s": round(generation_s, 1), "generated_sequences": args.generated,
        "batch_size": args.batch_size, "context": CONTEXT, "learning_rate": args.learning_rate, "seed": SEED,
        "torch_threads": args.threads,
        "held_out_greedy_agreement_before": round(before, 4), "held_out_greedy_agreement_after": round(after, 4),
    }
    (args.out / "distillation.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
