"""Train the bundled LoRA adapter ``pagedserve/tiny-py-lora-tests`` on the bundled model.

    python scripts/train_lora_adapter.py [--steps 150] [--threads 1]

The base model (``pagedserve/tiny-py``) was trained on the standard library with its test
suites left out; this adapter is trained on exactly those: every ``test_*.py`` under the
stdlib's ``test`` folder, sorted by relative path, file i held out when i % 20 == 19 (the base
corpus's rule). PEFT makes and saves the adapter (r=8 on every linear layer); the held-out
perplexity of the test files is measured with and without it, and of the base corpus's own
held-out files (what the adapter costs elsewhere). Writes the adapter, ``eval.json`` and the
model card into ``pagedserve/assets/tiny-py-lora-tests``. A few CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from pagedserve.assets import ASSETS_DIR, bundled_model_path  # noqa: E402
from pagedserve.assets.corpus import eval_windows, split_files, token_stream  # noqa: E402

SEED = 0
BASE = "pagedserve/tiny-py"
FOLDER = ASSETS_DIR / "tiny-py-lora-tests"
HELD_OUT_EVERY = 20
CONTEXT = 256
BATCH = 8
LEARNING_RATE = 2e-3
EVAL_WINDOWS = 32
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear"}
SPLIT_RULE = (
    'sysconfig.get_paths()["stdlib"] / "test", every file named test_*.py (recursively), sorted by '
    f"relative POSIX path; file i (0-based) is held out when i % {HELD_OUT_EVERY} == {HELD_OUT_EVERY - 1}"
)


def test_files() -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(root.rglob("test_*.py"), key=lambda p: p.relative_to(root).as_posix())
    held = [p for i, p in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [p for i, p in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for window in windows:
        logits = model(input_ids=torch.tensor([window])).logits[0, :-1].float()
        targets = torch.tensor(window[1:])
        nll -= torch.log_softmax(logits, -1).gather(1, targets[:, None]).double().sum().item()
        count += len(window) - 1
    return math.exp(nll / count)


def write_card(report: dict) -> None:
    """The model card (README.md), from the report (PEFT's template card is replaced)."""
    ev, tr, corpus = report["evaluation"], report["training"], report["corpus"]
    tests, stdlib = ev["held_out_test_files_perplexity"], ev["held_out_stdlib_perplexity"]
    card = f"""---
base_model: {BASE}
library_name: peft
tags: [lora, pagedserve]
---

# tiny-py-lora-tests

A LoRA adapter (r={report['lora']['r']}, alpha={report['lora']['lora_alpha']}, every linear layer) of
`{BASE}` that specialises it on Python test suites. pagedserve ships it so that

    pagedserve serve --enable-lora --lora-modules tests=pagedserve/tiny-py-lora-tests

works with no download; requests with `"model": "tests"` run with it.

## Data

The base model was trained on the standard library with its test folders left out; this adapter
is trained on exactly those: {corpus['split_rule']}. {corpus['train_files']} files
({corpus['train_tokens']} tokens) trained on, {corpus['held_out_files']} held out.

## Training

`{report['command']}`: {tr['steps']} AdamW steps of {tr['batch']} random windows of {tr['context']} tokens
({tr['tokens']} tokens, a fraction of one epoch), learning rate {tr['learning_rate']} with a short warm-up and a
cosine decay, fp32, seed {report['seed']}, {tr['torch_threads']} CPU thread, {tr['wall_s']} s wall time on a
shared CPU. Final training loss {tr['final_train_loss']}.

## Effect (held-out perplexity, first {ev['windows']} windows of {ev['context']} tokens)

| held-out text | base model | with the adapter |
|---|---|---|
| standard library test files (this adapter's domain) | {tests['base']} | {tests['with_adapter']} |
| the base model's own held-out files | {stdlib['base']} | {stdlib['with_adapter']} |

It lowers perplexity on unseen test files by {100 * (1 - tests['with_adapter'] / tests['base']):.0f}% and costs
{100 * (stdlib['with_adapter'] / stdlib['base'] - 1):.0f}% on the base model's own domain: what a LoRA fine-tune is for.

## Limits

A 7.9M-parameter base model trained for minutes on one CPU: it writes test-shaped Python
(`self.assertEqual`, `unittest.main()`), not working tests. Versions: {report['versions']}.
"""
    (FOLDER / "README.md").write_text(card)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    base_dir = bundled_model_path(BASE)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    train_files, held_files = test_files()
    train_stream = torch.tensor(token_stream(encode, train_files, bos, eos), dtype=torch.int32)
    held = eval_windows(token_stream(encode, held_files, bos, eos), 512)[:EVAL_WINDOWS]
    base_held = eval_windows(token_stream(encode, split_files()[1], bos, eos), 512)[:EVAL_WINDOWS]
    print(f"train {len(train_files)} files {len(train_stream)} tokens; held out {len(held_files)} files", flush=True)

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.eval()
    before = {"tests": perplexity(model, held), "stdlib": perplexity(model, base_held)}
    model = get_peft_model(model, LoraConfig(**LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    generator = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(CONTEXT)
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        starts = torch.randint(0, len(train_stream) - CONTEXT, (BATCH, 1), generator=generator)
        batch = train_stream[starts + offsets].long()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} {time.perf_counter() - start:6.0f}s", flush=True)
    wall = time.perf_counter() - start
    model.eval()
    after = {"tests": perplexity(model, held), "stdlib": perplexity(model, base_held)}
    FOLDER.mkdir(exist_ok=True)
    model.save_pretrained(FOLDER)
    config_path = FOLDER / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = BASE  # not this machine's folder
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    report = {
        "command": "python scripts/train_lora_adapter.py" + (f" --steps {args.steps}" if args.steps != 80 else ""),
        "base_model": BASE,
        "seed": SEED,
        "lora": LORA,
        "training": {"steps": args.steps, "batch": BATCH, "context": CONTEXT, "tokens": args.steps * BATCH * CONTEXT,
                     "learning_rate": LEARNING_RATE, "wall_s": round(wall, 1), "torch_threads": args.threads,
                     "final_train_loss": round(sum(losses[-10:]) / 10, 4)},
        "corpus": {"split_rule": SPLIT_RULE, "train_files": len(train_files), "train_tokens": len(train_stream),
                   "held_out_files": len(held_files)},
        "evaluation": {"windows": EVAL_WINDOWS, "context": 512,
                       "held_out_test_files_perplexity": {"base": round(before["tests"], 3), "with_adapter": round(after["tests"], 3)},
                       "held_out_stdlib_perplexity": {"base": round(before["stdlib"], 3), "with_adapter": round(after["stdlib"], 3)}},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
    }
    (FOLDER / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    write_card(report)
    print(json.dumps(report["evaluation"], indent=1))


if __name__ == "__main__":
    main()
