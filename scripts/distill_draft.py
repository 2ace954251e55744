"""Distil the bundled draft from the bundled target: train ``pagedserve/tiny-py-draft`` on
``pagedserve/tiny-py``'s next-token distributions, so that it agrees with the target rather than
with the text.

    python scripts/distill_draft.py --out /tmp/draft --layers 2 --steps 3000

Data: ``--generated-rows`` of every batch of ``--batch-size`` are the target's own greedy
continuations (``--generated`` of them, through pagedserve), the others random windows of the
corpus's training split. A continuation starts from a training file's first 128-256 tokens
(half of them; what ``bench latency --workload stdlib`` asks of held-out files) or a window at a
seeded offset and runs to ``CONTEXT`` tokens, because what a draft is asked to predict at
serving time is what the target writes, not the corpus. Loss: on a continuation, the
cross-entropy against its tokens, each the target's argmax after the ones before it (what greedy
verification accepts; sequence-level distillation, which needs no target forward in training);
at every position of a corpus window, the cross-entropy against the target's softmax at
``--kd-temperature`` (forward KL) plus ``--hard-weight`` times the cross-entropy against the
target's most likely token. AdamW, bf16 autocast over fp32 weights, cosine decay, a fixed seed.
The draft starts from ``--init`` (default: the bundled draft), keeping its first ``--layers``
layers.

Every ``--eval-every`` steps the draft's mean accepted length at k = 4 under greedy decoding is
computed exactly, without running the engine, on the target's greedy continuations of the
held-out stdlib prompts (``bench latency --workload stdlib``: the first 256 tokens of each
held-out file, 64 new tokens): while the draft's proposals match, its input is the target's
text, so one forward over the target's continuation gives every proposal. The best checkpoint
is kept. Writes the draft (fp16 safetensors, the target's tokenizer files,
``distillation.json``) to ``--out``. Measure its speed-up with ``pagedserve bench latency
--workload stdlib --speculative-config '{"method": "draft_model", "model": OUT,
"num_speculative_tokens": 4}'``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
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
from pagedserve.assets.corpus import eval_windows, read_document, split_files, token_stream  # noqa: E402

SEED = 0
CONTEXT = 320  # bench latency's stdlib prompts (256 tokens) and 64 new tokens
EVAL_PROMPT_TOKENS = 256
EVAL_NEW_TOKENS = 64
K = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@torch.no_grad()
def agreement(draft, target, windows: list[list[int]]) -> float:
    same = total = 0
    for window in windows:
        ids = torch.tensor([window])
        same += (draft(input_ids=ids).logits.argmax(-1) == target(input_ids=ids).logits.argmax(-1)).sum().item()
        total += len(window)
    return same / total


@torch.no_grad()
def accepted_length(draft, sequences: list[tuple[int, list[int]]], k: int = K) -> float:
    """Mean accepted length (tokens per verification step, the target's own included) of greedy
    speculative decoding with ``k`` proposals, for ``(prompt_len, prompt + target's greedy
    continuation)`` pairs; the first new token comes from the prefill, as in the engine."""
    drafts = accepted = 0
    for prompt_len, seq in sequences:
        predicted = draft(input_ids=torch.tensor([seq])).logits[0].argmax(-1).tolist()
        pos = prompt_len + 1  # seq[:pos] known; the draft proposes seq[pos], seq[pos + 1], ...
        while pos < len(seq):
            n = min(k, len(seq) - pos - 1)
            if n <= 0:
                break
            run = 0
            while run < n and predicted[pos - 1 + run] == seq[pos + run]:
                run += 1
            drafts += 1
            accepted += run
            pos += run + 1
    return 1 + accepted / max(drafts, 1)


def keep_layers(model, layers: int):
    """The model with only its first ``layers`` decoder layers (the others dropped)."""
    if layers > model.config.num_hidden_layers:
        raise SystemExit(f"--layers {layers}: the initial draft has only {model.config.num_hidden_layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def generate(target_dir: Path, prompts: list[list[int]], new_tokens: list[int], greedy: list[bool]) -> list[list[int]]:
    """Each prompt followed by the target's continuation (greedy, or sampled at temperature 0.8
    with a per-prompt seed), through pagedserve."""
    from pagedserve import LLM, SamplingParams

    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) if g else
              SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.8, seed=i)
              for i, (n, g) in enumerate(zip(new_tokens, greedy))]
    llm = LLM(str(target_dir), max_num_seqs=64)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    result = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, outputs)]
    del llm
    return result


def training_prompts(documents: list[list[int]], stream: torch.Tensor, count: int) -> list[list[int]]:
    """``count`` prompts of 128-256 tokens: even ones a training file's start (``bos`` included),
    odd ones a window of the training stream at a seeded offset."""
    generator = torch.Generator().manual_seed(SEED + 1)
    long_documents = [d for d in documents if len(d) > 64]
    prompts = []
    for i in range(count):
        length = int(torch.randint(128, EVAL_PROMPT_TOKENS + 1, (1,), generator=generator))
        if i % 2 == 0:
            document = long_documents[int(torch.randint(0, len(long_documents), (1,), generator=generator))]
            prompts.append(document[:length])
        else:
            start = int(torch.randint(0, len(stream) - length, (1,), generator=generator))
            prompts.append(stream[start : start + length].tolist())
    return prompts


def padded(sequences: list[list[int]], prompt_lens: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequences right-padded to ``CONTEXT`` and a mask of their continuation tokens."""
    ids = torch.full((len(sequences), CONTEXT), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), CONTEXT), dtype=torch.bool)
    for i, (seq, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        ids[i, : len(seq)] = torch.tensor(seq[:CONTEXT])
        mask[i, prompt_len : len(seq)] = True
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=Path, default=bundled_model_path(DEFAULT_MODEL))
    parser.add_argument("--init", type=Path, default=bundled_model_path(DRAFT_MODEL), help="the initial draft")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the initial draft to keep")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-minutes", type=float, default=60.0, help="stop early after this long")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--generated-rows", type=int, default=6, help="rows of a batch from the continuations")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--generated", type=int, default=1024, help="target continuations to train on")
    parser.add_argument("--kd-temperature", type=float, default=1.0, help="temperature of both softmaxes")
    parser.add_argument("--hard-weight", type=float, default=0.5, help="weight of the target-argmax loss")
    parser.add_argument("--eval-every", type=int, default=200)
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
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    stream = torch.tensor(token_stream(encode, train_files, bos, eos))
    windows = eval_windows(token_stream(encode, held_out, bos, eos), CONTEXT)[: args.eval_windows]

    start = time.perf_counter()
    eval_prompts = [p for p in ([bos, *encode(read_document(f))][:EVAL_PROMPT_TOKENS] for f in held_out) if len(p) > 16]
    eval_sequences = list(zip(map(len, eval_prompts), generate(
        args.target, eval_prompts, [EVAL_NEW_TOKENS] * len(eval_prompts), [True] * len(eval_prompts))))
    documents = [[bos, *encode(read_document(f))][:EVAL_PROMPT_TOKENS] for f in train_files]
    prompts = training_prompts(documents, stream, args.generated)
    generated = None
    if args.generated:
        continued = generate(args.target, prompts, [CONTEXT - len(p) for p in prompts], [True] * len(prompts))
        generated = padded(continued, [len(p) for p in prompts], pad)
    generation_s = time.perf_counter() - start
    print(f"{len(eval_sequences)} held-out and {args.generated} training continuations in {generation_s:.0f}s",
          flush=True)
    before = agreement(draft.eval(), target, windows)
    best_length = accepted_length(draft, eval_sequences)
    initial_length = best_length
    best_state, best_step = copy.deepcopy(draft.state_dict()), 0
    print(f"before: held-out greedy agreement {before:.4f}, mean accepted length {best_length:.3f}", flush=True)

    optimizer = torch.optim.AdamW(draft.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps))
    )
    generator = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(CONTEXT)
    generated_rows = min(args.generated_rows, args.batch_size) if generated is not None else 0
    corpus_rows = args.batch_size - generated_rows
    history = []
    draft.train()
    start = time.perf_counter()
    step = 0
    while step < args.steps and time.perf_counter() - start < args.max_minutes * 60:
        starts = torch.randint(0, len(stream) - CONTEXT, (corpus_rows, 1), generator=generator)
        corpus = stream[starts + offsets].long()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                target_logits = target(input_ids=corpus).logits.float()[:, :-1].flatten(0, 1)
            draft_logits = draft(input_ids=corpus).logits.float()[:, :-1].flatten(0, 1)
        soft = torch.softmax(target_logits / args.kd_temperature, dim=-1)
        log_q = torch.log_softmax(draft_logits / args.kd_temperature, dim=-1)
        per_position = -(soft * log_q).sum(-1) * args.kd_temperature**2
        if args.hard_weight:
            per_position = per_position + args.hard_weight * torch.nn.functional.cross_entropy(
                draft_logits, target_logits.argmax(-1), reduction="none")
        losses = [per_position]
        if generated_rows:
            # The target's greedy continuations: each token is the target's argmax after the
            # tokens before it, so the labels need no target forward (sequence-level KD).
            rows = torch.randint(0, len(generated[0]), (generated_rows,), generator=generator)
            ids, labelled = generated[0][rows], generated[1][rows]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = draft(input_ids=ids).logits.float()[:, :-1]
            losses.append(torch.nn.functional.cross_entropy(logits[labelled[:, 1:]], ids[:, 1:][labelled[:, 1:]],
                                                            reduction="none"))
        loss = torch.cat(losses).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 25 == 0:
            print(f"step {step:5d} loss {loss.item():.4f} {time.perf_counter() - start:6.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            draft.eval()
            length = accepted_length(draft, eval_sequences)
            draft.train()
            history.append({"step": step, "mean_accepted_length": round(length, 4),
                            "minutes": round((time.perf_counter() - start) / 60, 1)})
            print(f"step {step:5d} held-out mean accepted length at k={K}: {length:.3f}", flush=True)
            if length > best_length:
                best_length, best_state, best_step = length, copy.deepcopy(draft.state_dict()), step
                save(draft, args, best_state)
                write_report(args, {
                    "steps": step, "kept_step": best_step, "wall_s": round(time.perf_counter() - start, 1),
                    "generation_s": round(generation_s, 1), "held_out_prompts": len(eval_sequences),
                    "held_out_mean_accepted_length_before": round(initial_length, 4),
                    "held_out_mean_accepted_length_after": round(best_length, 4), "history": history,
                    "stopped": "still running",
                })
    wall_s = time.perf_counter() - start
    draft.load_state_dict(best_state)
    draft.eval()
    after = agreement(draft, target, windows)
    print(f"kept step {best_step}: held-out greedy agreement {after:.4f}, mean accepted length {best_length:.3f}",
          flush=True)
    save(draft, args, best_state)
    report = write_report(args, {
        "steps": step, "kept_step": best_step, "wall_s": round(wall_s, 1), "generation_s": round(generation_s, 1),
        "generated_rows": generated_rows, "held_out_greedy_agreement_before": round(before, 4),
        "held_out_greedy_agreement_after": round(after, 4), "held_out_prompts": len(eval_sequences),
        "held_out_mean_accepted_length_before": round(initial_length, 4),
        "held_out_mean_accepted_length_after": round(best_length, 4), "history": history,
    })
    print(json.dumps(report))


def write_report(args: argparse.Namespace, run: dict) -> dict:
    """``distillation.json`` in ``--out``: the settings and the run's measurements so far (written
    with every kept checkpoint, so that a run stopped early still describes what it kept). A
    run from another run's output (``--init`` holding a ``distillation.json``) keeps that run's
    report as ``init_distillation``, its folder named ``FIRST_OUT`` in the command."""
    first = _init_report(args.init)
    report = {
        "command": "python scripts/distill_draft.py " + " ".join(
            "OUT" if a == str(args.out) else "FIRST_OUT" if a == str(args.init) and first else a for a in sys.argv[1:]),
        "target_sha256": hashlib.sha256((args.target / "model.safetensors").read_bytes()).hexdigest(),
        "init_sha256": hashlib.sha256((args.init / "model.safetensors").read_bytes()).hexdigest(),
        "layers": args.layers, "planned_steps": args.steps, "generated_sequences": args.generated,
        "batch_size": args.batch_size, "context": CONTEXT,
        "learning_rate": args.learning_rate, "kd_temperature": args.kd_temperature, "hard_weight": args.hard_weight,
        "seed": SEED, "torch_threads": args.threads, **run,
    }
    if first:
        report["init_distillation"] = first
    (args.out / "distillation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _init_report(init: Path) -> dict | None:
    file = init / "distillation.json"
    if init.resolve() == bundled_model_path(DRAFT_MODEL).resolve() or not file.is_file():
        return None
    return json.loads(file.read_text())


def save(draft, args: argparse.Namespace, state: dict) -> None:
    """The draft with ``state`` as fp16 safetensors and the target's tokenizer files in ``--out``."""
    shutil.rmtree(args.out, ignore_errors=True)
    half = copy.deepcopy(draft)
    half.load_state_dict(state)
    half.to(torch.float16).save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.target / name).is_file():
            shutil.copy(args.target / name, args.out / name)


if __name__ == "__main__":
    main()
