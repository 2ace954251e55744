"""The model card (README.md) of a bundled model, rendered from the training manifest."""

from __future__ import annotations

from typing import Any

ROLES = {
    "tiny-py": "the default model of `pagedserve generate` and `pagedserve serve`",
    "tiny-py-draft": "the draft model for speculative decoding with `pagedserve/tiny-py` (same tokenizer)",
    "tiny-py-mistral": "a Mistral variant with a sliding window shorter than its context, for testing that path",
}


def _shape(settings: dict[str, Any], entry: dict[str, Any], context: int) -> str:
    window = settings["sliding_window"]
    rows = [
        ("architecture", f"`{entry['architecture']}`"),
        ("parameters", f"{entry['parameters']:,}"),
        ("layers", settings["num_hidden_layers"]),
        ("hidden size", settings["hidden_size"]),
        ("MLP size", settings["intermediate_size"]),
        ("attention heads / KV heads / head size",
         f"{settings['num_attention_heads']} / {settings['num_key_value_heads']} / {settings['head_dim']}"),
        ("context", f"{context} tokens" + (f", sliding window {window}" if window else "")),
        ("tied input/output embeddings", "yes" if settings["tie_word_embeddings"] else "no"),
        ("forward FLOPs per token (context 0 / full)",
         " / ".join(f"{v:,}" for v in entry["flops_per_token"].values())),
        ("weights", "fp16 safetensors"),
    ]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def _training(settings: dict[str, Any], entry: dict[str, Any], manifest: dict[str, Any], context: int) -> str:
    training = entry["training"]
    beta1, beta2 = settings["betas"]
    rows = [
        ("optimizer", f"AdamW (β {beta1}, {beta2}; weight decay {settings['weight_decay']} on matrices), "
                      f"gradient clipping {settings['grad_clip']}"),
        ("schedule", f"peak learning rate {settings['learning_rate']}, {settings['warmup_steps']} linear warm-up "
                     f"steps, cosine to {settings['min_lr_ratio']}× peak"),
        ("steps × batch", f"{training['steps']} × {settings['batch_size']} windows of {context} random-offset "
                          f"tokens ({training['tokens']:,} tokens)"),
        ("precision", manifest["precision"]),
        ("seed / torch threads", f"{manifest['seed']} / {manifest['torch_threads']}"),
        ("final training loss (mean of the last 50 steps)", training["final_train_loss"]),
        ("training wall time", f"{training['wall_s'] / 60:.1f} min on a shared 2-core CPU "
                               f"(whole run, all three models and evaluation: {manifest['total_wall_s'] / 60:.1f} min)"),
    ]
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def _quantization_note(settings: dict[str, Any]) -> str:
    q_size = settings["num_attention_heads"] * settings["head_dim"]
    kv_size = settings["num_key_value_heads"] * settings["head_dim"]
    sizes = (settings["hidden_size"], settings["intermediate_size"], q_size, kv_size)
    if all(size % 128 == 0 for size in sizes):
        return ("Every linear layer's input and output sizes are multiples of 128, so AWQ/GPTQ with "
                "group size 128 apply to all of them.")
    return "Not every linear layer's sizes are multiples of 128 (AWQ/GPTQ group size 128 do not all apply)."


def _draft_note(folder: str, manifest: dict[str, Any]) -> str:
    if folder != "tiny-py-draft":
        return ""
    draft, target = (manifest["models"][name]["flops_per_token"] for name in (folder, "tiny-py"))
    ratios = " and ".join(f"{draft[c] / target[c]:.3f} at context {c}" for c in draft)
    return f"\n\nIts forward pass costs {ratios} of `pagedserve/tiny-py`'s FLOPs per token (at most 1/8)."


def _other_models(folder: str, manifest: dict[str, Any]) -> str:
    """Rows comparing the other bundled models' held-out perplexities."""
    return "".join(
        f"| `{entry['short_name']}` ({entry['parameters']:,} parameters) | {entry['evaluation']['held_out_perplexity']} |\n"
        for name, entry in manifest["models"].items()
        if name != folder
    )


def _limitations(manifest: dict[str, Any]) -> str:
    models = manifest["models"]
    target, draft = models["tiny-py"], models["tiny-py-draft"]
    tokens = sorted(m["training"]["tokens"] for m in models.values())
    epochs = [t / manifest["corpus"]["train_tokens"] for t in (tokens[0], tokens[-1])]
    return (
        f"Each model saw {tokens[0] / 1e6:.1f} to {tokens[-1] / 1e6:.1f} million tokens ({epochs[0]:.1f} to "
        f"{epochs[1]:.1f} epochs) on one CPU thread. That is enough for a held-out perplexity far below the "
        f"unigram baseline, not for size to pay off yet: the {draft['parameters'] / 1e6:.2f}M-parameter draft "
        f"reaches {draft['evaluation']['held_out_perplexity']} against the {target['parameters'] / 1e6:.2f}M-"
        f"parameter target's {target['evaluation']['held_out_perplexity']}; more training steps (`SPECS` in "
        "the script) are what would set the target apart. The models complete Python code in the style of "
        "the standard library; they follow no instructions and know no facts."
    )


def _agreement_note(results: dict[str, Any]) -> str:
    agreement = results.get("greedy_agreement_with_target")
    if agreement is None:
        return ""
    return (
        f"\nOn the held-out windows the draft's most likely next token is the target's {agreement:.1%} "
        "of the time: an estimate of how often greedy speculative decoding accepts a draft token.\n"
    )


def render_card(folder: str, manifest: dict[str, Any], samples: list[tuple[str, str]], max_tokens: int) -> str:
    """Markdown for ``folder``'s README.md; ``samples`` are (prompt, greedy completion) pairs."""
    entry = manifest["models"][folder]
    settings = entry["settings"]
    corpus, evaluation, versions = manifest["corpus"], manifest["evaluation"], manifest["versions"]
    context = evaluation["context"]
    results = entry["evaluation"]
    unigram = manifest["tokenizer"]["unigram_perplexity"]
    sample_text = "\n\n".join(
        f"Prompt `{prompt!r}`:\n\n```python\n{prompt}{completion}\n```" for prompt, completion in samples
    )
    return f"""---
license: apache-2.0
language: [code]
library_name: pagedserve
pipeline_tag: text-generation
---

# {entry['short_name']}

A tiny `{entry['architecture']}` trained from scratch on the Python standard library, shipped
inside pagedserve: {ROLES[folder]}. It completes Python code; it knows nothing else, and its
chat template only exists so that the chat APIs have something to render.

```python
from pagedserve import LLM, SamplingParams
llm = LLM("{entry['short_name']}")
print(llm.generate("def fibonacci(n):", SamplingParams(temperature=0, max_tokens=64))[0].outputs[0].text)
```

## Model

| | |
|---|---|
{_shape(settings, entry, context)}

{_quantization_note(settings)}{_draft_note(folder, manifest)}

## Tokenizer

Byte-level BPE (`tokenizers`), {manifest['tokenizer']['vocab_size']} tokens, trained on the training
split; `<s>` (0, prepended when encoding), `</s>` (1, ends every document), `<pad>` (2); shared by
all bundled models.

## Corpus

The `.py` sources of the Python {versions['python']} standard library. The split rule
(`pagedserve/assets/corpus.py`): {corpus['split_rule']}.

- training: {corpus['train_files']} files, {corpus['train_bytes']:,} bytes, {corpus['train_tokens']:,} tokens
- held out: {corpus['held_out_files']} files, {corpus['held_out_tokens']:,} tokens

Each file is one document, `<s>` + its tokens + `</s>`, concatenated.

## Training

Plain PyTorch on the transformers model class, `scripts/train_tiny_model.py`:

| | |
|---|---|
{_training(settings, entry, manifest, context)}

## Evaluation

Held-out perplexity: the held-out token stream cut into consecutive windows of {context} tokens
({evaluation['windows']} windows, {evaluation['predicted_tokens']:,} predicted tokens), the shipped fp16
weights computed in fp32. The unigram baseline is the add-one-smoothed token frequency of the
training split, on the same tokenizer and the same predicted tokens.

| | perplexity |
|---|---|
| this model | **{results['held_out_perplexity']}** |
| unigram baseline | {unigram} |
{_other_models(folder, manifest)}| first {evaluation['slice_windows']} windows only (checked by `tests/test_bundled_models.py`) | {results['slice_perplexity']} |
{_agreement_note(results)}
## Samples

Greedy (temperature 0), at most {max_tokens} new tokens, generated by pagedserve itself with
this folder's weights when the card was written, unedited. A model this small falls into loops
after a few lines when decoding greedily; sampling (temperature 0.7 to 1) varies more. End a
prompt at its last non-blank character: the tokenizer merges a newline with the indentation that
follows it, so a prompt ending in a bare newline ends in the middle of a token.

{sample_text}

## Limitations

{_limitations(manifest)}

## Reproduce

```
{manifest['command']}
```

with Python {versions['python']}, torch {versions['torch']}, transformers {versions['transformers']},
tokenizers {versions['tokenizers']}. The seed, the data order and the settings are fixed, and the
tokenizer comes out byte for byte the same; the weights should repeat with the same versions on the
same kind of CPU, while other CPUs round bf16 matmuls differently: expect close perplexities there,
not identical weights. `pagedserve/assets/manifest.json` records every setting, the wall times, the
perplexities and the SHA-256 of every file here; `python scripts/train_tiny_model.py --cards`
regenerates the samples, the cards and the checksums without training. The training corpus, the
CPython standard library, is under the Python Software Foundation License.
"""
