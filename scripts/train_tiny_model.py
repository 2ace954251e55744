"""Train the bundled models (``pagedserve/assets``) on the running interpreter's standard library.

    python scripts/train_tiny_model.py            # tokenizer, three models, evaluation, cards
    python scripts/train_tiny_model.py --cards    # only the samples, model cards and manifest
    python scripts/train_tiny_model.py --continue-target FOLDER   # only tiny-py's second stage

One run trains a byte-level BPE tokenizer, then the target (``tiny-py``, Llama), its draft
(``tiny-py-draft``) and a Mistral variant with a sliding window (``tiny-py-mistral``), each from
the fixed seed with the settings in ``SPECS``; evaluates each on the held-out split
(``pagedserve.assets.corpus``) against a unigram baseline; greedy-completes a few snippets with
pagedserve itself; and writes the weights (fp16 safetensors), ``manifest.json`` (settings, wall
times, perplexities, checksums) and a model card per folder. Training is single-threaded by
default (``--threads``): on a shared CPU, extra threads mostly wait on each other.

The target is trained in two stages: the first on the corpus alone (``SPECS``), the second
(``TARGET_STAGE2``) continues from it with a fresh warm-up and cosine, and a share of every batch
made of instruction pairs built from the training files (``instruction_pairs.py``: the user asks
for a function by its docstring, the assistant answers with the function, in the chat template;
the loss is on the answer only), so that one model both completes code and follows "write a
function that ...". ``--continue-target FOLDER`` runs only the second stage from a first-stage
folder (its tokenizer is kept) and replaces only tiny-py's entry in the manifest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizers thread pool, read at import

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from pagedserve.assets import ASSETS_DIR, BUNDLED_MODELS, forward_flops_per_token  # noqa: E402
from pagedserve.assets.corpus import SPLIT_RULE, eval_windows, read_document, split_files, token_stream  # noqa: E402
from tiny_model_card import render_card  # noqa: E402

SEED = 0
VOCAB_SIZE = 4096
CONTEXT = 512
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
#: The held-out slice the tests recompute: the first windows of the held-out stream.
SLICE_WINDOWS = 4
#: Renders system/user/assistant turns; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
#: Each ends at its last non-blank character: byte-level BPE merges a newline with the indentation
#: after it, so a prompt ending in a bare newline ends mid-token, which training never shows.
SAMPLE_PROMPTS = (
    "def fibonacci(n):",
    "import os\nimport sys\n\n\ndef main(argv):",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):',
    "def read_lines(path):\n    with open(path",
)
SAMPLE_TOKENS = 64
CHAT_SAMPLES = ("Write a function that returns the factorial of n.",
                "Write a function that reads a file and returns its lines.")
#: The target's sampling defaults (generation_config.json), chosen by ``scripts/eval_tiny_model.py
#: --sweep``: the fewest outputs that loop for the most answers that parse (the card has the table).
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model's shape and training settings (all recorded in the manifest)."""

    folder: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    sliding_window: int | None = None
    head_dim: int = 64
    tie_word_embeddings: bool = True
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    #: Rows of each batch drawn from the instruction pairs instead of the corpus.
    instruction_rows: int = 0


SPECS = (
    ModelSpec(
        "tiny-py", "LlamaForCausalLM", hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, steps=1200, batch_size=8, learning_rate=2e-3, warmup_steps=60,
    ),
    ModelSpec(
        "tiny-py-mistral", "MistralForCausalLM", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, steps=1000, batch_size=8, learning_rate=2e-3, warmup_steps=50,
        sliding_window=128,
    ),
    ModelSpec(
        "tiny-py-draft", "LlamaForCausalLM", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, steps=1500, batch_size=8, learning_rate=3e-3, warmup_steps=50,
    ),
)
TARGET, DRAFT = "tiny-py", "tiny-py-draft"
#: The target's second stage, continued from its first (the ``tiny-py`` entry of ``SPECS``).
TARGET_STAGE2 = dataclasses.replace(
    SPECS[0], steps=1600, learning_rate=1e-3, warmup_steps=50, instruction_rows=2
)


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the training texts; it prepends ``<s>`` when encoding."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    bos, eos, pad = SPECIAL_TOKENS
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, model_max_length=CONTEXT
    )
    wrapped.chat_template = CHAT_TEMPLATE
    if [wrapped.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] != [BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError("special tokens did not get ids 0, 1, 2")
    return wrapped


def hf_config(spec: ModelSpec) -> LlamaConfig | MistralConfig:
    mistral = spec.architecture == "MistralForCausalLM"
    extra = {"sliding_window": spec.sliding_window} if mistral else {}
    return (MistralConfig if mistral else LlamaConfig)(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        architectures=[spec.architecture],
        **extra,
    )


def build_model(spec: ModelSpec) -> PreTrainedModel:
    """The untrained model, initialized from the fixed seed."""
    config = hf_config(spec)
    torch.manual_seed(SEED)
    return (MistralForCausalLM if isinstance(config, MistralConfig) else LlamaForCausalLM)(config)


def lr_factor(step: int, spec: ModelSpec) -> float:
    """Linear warm-up, then a cosine from 1 down to ``min_lr_ratio``."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def instruction_stream(tokenizer: PreTrainedTokenizerFast, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training files' instruction pairs in the chat template, shuffled at the fixed seed and
    concatenated: (token ids, which of them are answer tokens, where each pair starts)."""
    import random

    from instruction_pairs import corpus_pairs, request

    pairs = corpus_pairs(files)
    random.Random(SEED).shuffle(pairs)
    ids: list[int] = []
    answer: list[bool] = []
    starts: list[int] = []
    for i, pair in enumerate(pairs):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": request(pair, i % 3)}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer.backend_tokenizer.encode(prompt, add_special_tokens=False).ids
        answer_ids = tokenizer.backend_tokenizer.encode(pair.source, add_special_tokens=False).ids + [EOS_ID]
        starts.append(len(ids))
        ids += prompt_ids + answer_ids
        answer += [False] * len(prompt_ids) + [True] * len(answer_ids)
    starts = [s for s in starts if s + CONTEXT <= len(ids)]
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(answer), torch.tensor(starts)


def train(
    model: PreTrainedModel,
    spec: ModelSpec,
    stream: torch.Tensor,
    steps: int,
    instructions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    checkpoints: Path | None = None,
) -> dict[str, Any]:
    """AdamW on random windows of the training stream, bf16 autocast over fp32 weights; with
    ``spec.instruction_rows``, that many rows of each batch are windows of the instruction stream
    starting at a pair, with the loss on answer tokens only. Saves the weights to ``checkpoints``
    every 200 steps when given."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
        betas=spec.betas,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, spec))
    generator = torch.Generator().manual_seed(SEED)
    offsets = torch.arange(CONTEXT)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        corpus_rows = spec.batch_size - spec.instruction_rows
        starts = torch.randint(0, len(stream) - CONTEXT, (corpus_rows, 1), generator=generator)
        batch = stream[starts + offsets].long()
        labels = batch
        if spec.instruction_rows:
            ids, answer, pair_starts = instructions
            chosen = pair_starts[torch.randint(0, len(pair_starts), (spec.instruction_rows,), generator=generator)]
            rows = ids[chosen[:, None] + offsets].long()
            batch = torch.cat([batch, rows])
            labels = torch.cat([labels, torch.where(answer[chosen[:, None] + offsets], rows, -100)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            rate = (step + 1) * spec.batch_size * CONTEXT / elapsed
            print(f"{spec.folder} step {step:5d} loss {loss.item():.3f} lr {schedule.get_last_lr()[0]:.2e} "
                  f"{elapsed:7.0f}s {rate:6.0f} tok/s", flush=True)
        if checkpoints and (step + 1) % 200 == 0:
            torch.save(model.state_dict(), checkpoints / f"step{step + 1}.pt")
    model.eval()
    tail = losses[-50:]
    return {
        "steps": steps,
        "tokens": steps * spec.batch_size * CONTEXT,
        "wall_s": round(time.perf_counter() - start, 1),
        "final_train_loss": round(sum(tail) / len(tail), 4),
    }


@torch.no_grad()
def window_log_probs(model: PreTrainedModel, window: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of each next token of the window, the argmax predictions), in fp32."""
    logits = model(input_ids=torch.tensor([window])).logits[0, :-1].float()
    targets = torch.tensor(window[1:])
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    return log_probs, logits.argmax(-1)


def perplexity(model: PreTrainedModel, windows: list[list[int]]) -> float:
    nll = sum(-window_log_probs(model, w)[0].double().sum().item() for w in windows)
    return math.exp(nll / sum(len(w) - 1 for w in windows))


def agreement(draft: PreTrainedModel, target: PreTrainedModel, windows: list[list[int]]) -> float:
    """How often the draft's argmax equals the target's on the held-out windows: an estimate of
    how often greedy speculative decoding accepts a draft token (measured on held-out text rather
    than on the models' own continuations)."""
    same = sum((window_log_probs(draft, w)[1] == window_log_probs(target, w)[1]).sum().item() for w in windows)
    return same / sum(len(w) - 1 for w in windows)


def unigram_perplexity(train_stream: list[int], windows: list[list[int]]) -> float:
    """Perplexity of add-one-smoothed training token frequencies on the same predicted tokens."""
    counts = Counter(train_stream)
    total = len(train_stream) + VOCAB_SIZE
    targets = [t for w in windows for t in w[1:]]
    nll = -sum(math.log((counts[t] + 1) / total) for t in targets)
    return math.exp(nll / len(targets))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ids_digest(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows).encode()).hexdigest()


def train_all(out: Path, max_steps: int | None) -> dict[str, Any]:
    """Tokenizer, models and their evaluation; the manifest without samples and checksums."""
    run_start = time.perf_counter()
    train_files, held_out_files = split_files()
    texts = [read_document(p) for p in train_files]
    tokenizer = train_tokenizer(texts)

    def encode(text: str) -> list[int]:
        return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    train_stream = token_stream(encode, train_files, BOS_ID, EOS_ID)
    held_out = token_stream(encode, held_out_files, BOS_ID, EOS_ID)
    windows = eval_windows(held_out, CONTEXT)
    stream = torch.tensor(train_stream, dtype=torch.int32)
    print(f"train {len(train_files)} files {len(train_stream)} tokens, held out {len(held_out_files)} "
          f"files {len(held_out)} tokens", flush=True)
    manifest: dict[str, Any] = {
        "command": "python scripts/train_tiny_model.py",
        "seed": SEED,
        "torch_threads": torch.get_num_threads(),
        "precision": "bf16 autocast over fp32 weights; shipped as fp16",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "corpus": {
            "split_rule": SPLIT_RULE,
            "train_files": len(train_files),
            "train_bytes": sum(len(t.encode()) for t in texts),
            "train_tokens": len(train_stream),
            "held_out_files": len(held_out_files),
            "held_out_tokens": len(held_out),
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": VOCAB_SIZE, "special_tokens": list(SPECIAL_TOKENS),
                      "unigram_perplexity": round(unigram_perplexity(train_stream, windows), 3)},
        "evaluation": {"context": CONTEXT, "windows": len(windows), "predicted_tokens": sum(len(w) - 1 for w in windows),
                       "slice_windows": SLICE_WINDOWS, "slice_ids_sha256": ids_digest(windows[:SLICE_WINDOWS])},
        "models": {},
    }
    short_names = {folder: name for name, folder in BUNDLED_MODELS.items()}
    for spec in SPECS:
        folder = out / spec.folder
        model = build_model(spec)
        record = train(model, spec, stream, min(spec.steps, max_steps or spec.steps))
        stage2 = None
        if spec.folder == TARGET:
            instructions = instruction_stream(tokenizer, train_files)
            stage2 = train(model, TARGET_STAGE2, stream, min(TARGET_STAGE2.steps, max_steps or TARGET_STAGE2.steps),
                           instructions)
        shutil.rmtree(folder, ignore_errors=True)
        model.to(torch.float16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        make_tokenizer_config_portable(folder)
        if stage2:
            write_generation_defaults(folder)
        shipped = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        evaluation = {
            "held_out_perplexity": round(perplexity(shipped, windows), 3),
            "slice_perplexity": round(perplexity(shipped, windows[:SLICE_WINDOWS]), 5),
        }
        if spec.folder == DRAFT:
            target = AutoModelForCausalLM.from_pretrained(out / TARGET, dtype=torch.float32).eval()
            evaluation["greedy_agreement_with_target"] = round(agreement(shipped, target, windows), 4)
        config = shipped.config
        manifest["models"][spec.folder] = {
            "short_name": short_names[spec.folder],
            "architecture": spec.architecture,
            "parameters": sum(p.numel() for p in shipped.parameters()),
            "flops_per_token": {str(c): forward_flops_per_token(config, c) for c in (0, CONTEXT)},
            "settings": dataclasses.asdict(spec),
            "training": record,
            "evaluation": evaluation,
        }
        if stage2:
            manifest["models"][spec.folder].update(stage2_record(stage2, len(instructions[0])))
        print(spec.folder, json.dumps(manifest["models"][spec.folder]["evaluation"]), flush=True)
    manifest["total_wall_s"] = round(time.perf_counter() - run_start, 1)
    return manifest


def stage2_record(record: dict[str, Any], instruction_tokens: int) -> dict[str, Any]:
    settings = dataclasses.asdict(TARGET_STAGE2)
    settings["instruction_tokens"] = instruction_tokens
    settings["torch_threads"] = torch.get_num_threads()
    settings["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    return {"stage2_settings": settings, "stage2_training": record}


def continue_target(first_stage: Path, out: Path, manifest: dict[str, Any], max_steps: int | None,
                    checkpoints: Path | None) -> None:
    """Only the target's second stage, from the first-stage folder ``first_stage`` (whose
    tokenizer files are copied unchanged); replaces the target's folder and manifest entry."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(first_stage)
    model = AutoModelForCausalLM.from_pretrained(first_stage, dtype=torch.float32)
    train_files, held_out_files = split_files()

    def encode(text: str) -> list[int]:
        return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    stream = torch.tensor(token_stream(encode, train_files, BOS_ID, EOS_ID), dtype=torch.int32)
    windows = eval_windows(token_stream(encode, held_out_files, BOS_ID, EOS_ID), CONTEXT)
    instructions = instruction_stream(tokenizer, train_files)
    print(f"instruction stream {len(instructions[0])} tokens, {len(instructions[2])} pairs", flush=True)
    steps = min(TARGET_STAGE2.steps, max_steps or TARGET_STAGE2.steps)
    record = train(model, TARGET_STAGE2, stream, steps, instructions, checkpoints)
    folder = out / TARGET
    keep = {name: (first_stage / name).read_bytes() for name in
            ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")}
    shutil.rmtree(folder, ignore_errors=True)
    model.to(torch.float16).save_pretrained(folder)
    for name, data in keep.items():
        (folder / name).write_bytes(data)
    write_generation_defaults(folder)
    shipped = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    entry = manifest["models"][TARGET]
    entry["evaluation"] = {
        "held_out_perplexity": round(perplexity(shipped, windows), 3),
        "slice_perplexity": round(perplexity(shipped, windows[:SLICE_WINDOWS]), 5),
    }
    entry.update(stage2_record(record, len(instructions[0])))
    entry["stage2_settings"]["initial_weights_sha256"] = sha256(first_stage / "model.safetensors")
    print(TARGET, json.dumps(entry["evaluation"]), flush=True)


def write_generation_defaults(folder: Path) -> None:
    """``GENERATION_DEFAULTS`` into the folder's generation_config.json."""
    path = folder / "generation_config.json"
    config = {**json.loads(path.read_text()), **GENERATION_DEFAULTS, "do_sample": True}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_tokenizer_config_portable(folder: Path) -> None:
    """Let transformers 4.45+ load the tokenizer, not only 5.x: 5.x writes the class name
    ``TokenizersBackend`` (unknown to 4.x) and a ``backend`` key, and 4.x before 4.50 reads the
    chat template only from tokenizer_config.json. ``PreTrainedTokenizerFast`` is the same
    class in 5.x."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("backend", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = (folder / "chat_template.jinja").read_text()
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def check_draft_cost() -> None:
    """Refuse settings whose draft costs more than an eighth of the target (before training)."""
    configs = {spec.folder: hf_config(spec) for spec in SPECS}
    for context in (0, CONTEXT):
        ratio = forward_flops_per_token(configs[DRAFT], context) / forward_flops_per_token(configs[TARGET], context)
        if ratio > 1 / 8:
            raise SystemExit(f"the draft costs {ratio:.3f} of the target at context {context}; at most 1/8 allowed")


def write_cards_and_checksums(out: Path, manifest: dict[str, Any]) -> None:
    """Greedy samples through pagedserve, a model card per folder, then every file's checksum."""
    from pagedserve import LLM, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=SAMPLE_TOKENS)
    for folder, entry in manifest["models"].items():
        llm = LLM(str(out / folder))
        outputs = llm.generate(list(SAMPLE_PROMPTS), params, use_tqdm=False)
        samples = [(p, o.outputs[0].text) for p, o in zip(SAMPLE_PROMPTS, outputs)]
        chat_samples = []
        if folder == TARGET:
            answers = llm.chat([[{"role": "user", "content": m}] for m in CHAT_SAMPLES],
                               SamplingParams(temperature=0.0, max_tokens=2 * SAMPLE_TOKENS), use_tqdm=False)
            chat_samples = [(m, o.outputs[0].text) for m, o in zip(CHAT_SAMPLES, answers)]
        (out / folder / "README.md").write_text(render_card(folder, manifest, samples, SAMPLE_TOKENS, chat_samples))
        files = sorted(p for p in (out / folder).iterdir() if p.is_file())
        for file in files:
            file.chmod(0o644)  # save_pretrained leaves the weights owner-only; installs must read them
        entry["files"] = {file.name: sha256(file) for file in files}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="where the model folders go")
    parser.add_argument("--cards", action="store_true", help="only regenerate samples, cards and checksums")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--max-steps", type=int, help="cap every model's steps (a smoke test, not for shipping)")
    parser.add_argument("--continue-target", type=Path, metavar="FOLDER",
                        help="only the target's second stage, from this first-stage folder")
    parser.add_argument("--checkpoints", type=Path, help="save the second stage's weights here every 200 steps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manifest_path = args.out / "manifest.json"
    if args.cards:
        manifest = json.loads(manifest_path.read_text())
    elif args.continue_target:
        manifest = json.loads((ASSETS_DIR / "manifest.json").read_text())
        continue_target(args.continue_target, args.out, manifest, args.max_steps, args.checkpoints)
        manifest["stage2_command"] = f"python scripts/train_tiny_model.py --continue-target {args.continue_target.name}"
        args.out.mkdir(parents=True, exist_ok=True)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {args.out / TARGET} and {manifest_path}; cards and checksums: --cards", flush=True)
        return
    else:
        check_draft_cost()
        manifest = train_all(args.out, args.max_steps)
        if args.max_steps:
            manifest["command"] += f" --max-steps {args.max_steps}"
    write_cards_and_checksums(args.out, manifest)
    print(f"wrote {manifest_path}", flush=True)


if __name__ == "__main__":
    main()
