"""The model card (README.md) of a bundled model, rendered from the training manifest."""

from __future__ import annotations

from typing import Any

ROLES = {
    "tiny-py": "the default model of `pagedserve generate`, `pagedserve chat` and `pagedserve serve`",
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
    if "distillation" in entry:
        return _distillation(entry["distillation"])
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
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return table + _stage2(entry, context)


def _stage2(entry: dict[str, Any], context: int) -> str:
    if "stage2_settings" not in entry:
        return ""
    settings, training = entry["stage2_settings"], entry["stage2_training"]
    rows = [
        ("schedule", f"peak learning rate {settings['learning_rate']}, {settings['warmup_steps']} warm-up steps, "
                     f"cosine to {settings['min_lr_ratio']}× peak"),
        ("steps × batch", f"{training['steps']} × {settings['batch_size']} windows of {context} tokens "
                          f"({training['tokens']:,} tokens), {settings['instruction_rows']} of the "
                          f"{settings['batch_size']} rows from the instruction pairs "
                          f"({settings['instruction_tokens']:,} tokens in all, loss on the answers only)"),
        ("final training loss (mean of the last 50 steps)", training["final_train_loss"]),
        ("training wall time", f"{training['wall_s'] / 60:.1f} min on a shared 2-core CPU, "
                               f"{settings.get('torch_threads', 1)} torch threads"),
    ]
    if "initial_weights_sha256" in settings:
        rows.append(("started from", f"the first stage's shipped fp16 weights (SHA-256 "
                                     f"`{settings['initial_weights_sha256'][:16]}…`), optimizer state fresh"))
    return (
        "\n\nSecond stage (`TARGET_STAGE2`): continued from the first with a share of every batch made of "
        "instruction pairs built from the training files (`scripts/instruction_pairs.py`): the user asks "
        "for a function by its docstring (\"Write a function that returns ...\", \"Write a Python function "
        "`name` that ...\" or the docstring's summary), the assistant answers with the function's source, "
        "in the chat template.\n\n| | |\n|---|---|\n"
        + "\n".join(f"| {name} | {value} |" for name, value in rows)
    )


def _distillation(report: dict[str, Any]) -> str:
    if "held_out_mean_accepted_length_after" not in report:  # a run of the script before it measured it
        method = ("cross-entropy against the target's next-token distribution at every position; half of each "
                  f"batch corpus windows, half the target's own continuations ({report['generated_sequences']}, "
                  "greedy and sampled)")
        initial = f"the previous (independently trained) draft, first {report['layers']} layer(s) kept"
    else:
        method = (f"{report['generated_rows']} of each batch's {report['batch_size']} rows the target's own greedy "
                  f"continuations ({report['generated_sequences']} of them, from training files' starts and windows; "
                  "cross-entropy against their tokens, i.e. the target's argmax: sequence-level distillation), the "
                  "others corpus windows (cross-entropy against the target's softmax at temperature "
                  f"{report['kd_temperature']} plus {report['hard_weight']}× against its argmax)")
        initial = (f"the previously bundled draft (SHA-256 `{report['init_sha256'][:16]}…`), first {report['layers']} "
                   "layer(s) kept")
        first = report.get("init_distillation")
        if first:
            initial = (f"a first distillation run's output (`FIRST_OUT`: {first['steps']} steps from the draft "
                       f"bundled before, SHA-256 `{first['init_sha256'][:16]}…`, {first['generated_sequences']} "
                       f"continuations, peak learning rate {first['learning_rate']}; held-out mean accepted length "
                       f"{first['held_out_mean_accepted_length_before']} -> "
                       f"{first['held_out_mean_accepted_length_after']})")
    rows = [
        ("method", f"distilled from `pagedserve/tiny-py` (`scripts/distill_draft.py`): {method}"),
        ("initial weights", initial),
        ("steps × batch", f"{report['steps']} × {report['batch_size']} rows of {report['context']} tokens, "
                          f"peak learning rate {report['learning_rate']}, cosine to 0.1×"
                          + (f"; the checkpoint of step {report['kept_step']} kept (the best held-out accepted "
                             "length)" if "kept_step" in report else "")),
        ("held-out greedy agreement with the target (8 windows)",
         f"{report['held_out_greedy_agreement_before']} before, {report['held_out_greedy_agreement_after']} after"),
    ]
    if "held_out_mean_accepted_length_after" in report:
        rows.append((f"held-out mean accepted length at k = 4, greedy ({report['held_out_prompts']} prompts, "
                     "computed from the models' outputs)",
                     f"{report['held_out_mean_accepted_length_before']} before, "
                     f"**{report['held_out_mean_accepted_length_after']}** after"))
    rows += [
        ("seed / torch threads", f"{report['seed']} / {report['torch_threads']}"),
        ("wall time", f"{report['wall_s'] / 60:.1f} min training + {report['generation_s'] / 60:.1f} min "
                      "generating the target's continuations, on a shared 2-core CPU"),
        ("command", f"`{report['command']}`, then `python scripts/install_assets.py --draft OUT`"),
    ]
    if "stopped" in report:
        rows.append(("stopped", report["stopped"]))
    return "\n".join(f"| {name} | {value} |" for name, value in rows)


def _output_quality(entry: dict[str, Any]) -> str:
    report = entry.get("output_eval")
    if not report:
        return ""
    rows = []
    for result in report["results"]:
        setting = ", ".join(f"{k} {v}" for k, v in result["setting"].items())
        rows.append(f"| {setting} | {result['completion_parses']:.0%} | {result['chat_parses']:.0%} | "
                    f"{result['completion_repeats_a_line_3x']:.0%} | {result['chat_repeats_a_line_3x']:.0%} | "
                    f"{result['chat_ends_by_itself']:.0%} |")
    defaults = ", ".join(f"`{k}` {v}" for k, v in report["generation_config_defaults"].items())
    return f"""
### What it writes

`scripts/eval_tiny_model.py`, through pagedserve: {report['prompts']} functions with docstrings from the
held-out files (a fixed seed), asked two ways. *Completion*: the `def` line and the docstring,
{report['completion_tokens']} new tokens at most, cut where the function ends; *chat*: "Write a function that
<the docstring's summary>." in the chat template, {report['chat_tokens']} tokens at most, the answer as it
comes. "Parses": `ast.parse` accepts it and it defines a function. "Loops": some line comes three times
in a row (in the uncut completion, or the chat answer); a loop within a line (`name, name, name, ...`)
shows instead as an answer that runs to the token limit rather than ending by itself. Sampled rows
use per-request seeds.

| sampling | completion parses | chat answer parses | completion loops | chat answer loops | chat answer ends by itself |
|---|---|---|---|---|---|
{chr(10).join(rows)}

The defaults in `generation_config.json` ({defaults}) are the sampling the server and `LLM.chat` use
when a request does not set them; they were chosen from the rows above: of the settings under which
at most 2% of chat answers loop, the one with the most chat answers that parse.
"""


def _acceptance(entry: dict[str, Any]) -> str:
    runs = entry.get("acceptance")
    if not runs:
        return ""
    rows = []
    for name, run in runs.items():
        settings = run.get("settings", {})
        spec = settings.get("speculative_config") or {}
        for key, result in run.get("results", {}).items():
            if key.startswith("speculative_batch_"):
                size = key.rsplit("_", 1)[1]
                threads = run.get("machine", {}).get("torch_threads", "")
                rows.append(f"| {settings.get('workload')} | {spec.get('num_speculative_tokens')} | {size} | {threads} | "
                            f"{result.get('mean_accepted_length', 0):.2f} | {result.get('acceptance_rate', 0):.2f} | "
                            f"{run['results'].get('speedup_batch_' + size, 0):.2f}x |")
    return f"""
### Acceptance

`pagedserve bench latency` (greedy, ignore_eos), `pagedserve/tiny-py` with this draft. Mean accepted
length: tokens per verification step, the target's own one included; speed-up: tokens/s against
no speculation in the same run, on a shared 2-core CPU (noisy: see docs/speculative.md).

| workload | k | batch | torch threads | mean accepted length | acceptance rate | speed-up |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""


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
    target = models["tiny-py"]
    tokens = target["training"]["tokens"] + target.get("stage2_training", {}).get("tokens", 0)
    return (
        f"The target saw {tokens / 1e6:.1f} million tokens ({tokens / manifest['corpus']['train_tokens']:.1f} "
        "epochs of the corpus) on a shared CPU: a model this small and this briefly trained writes code in "
        "the style of the standard library, often plausible and often wrong; it follows only the one kind "
        "of instruction it was trained on (\"write a function that ...\"), knows no facts, and its "
        f"held-out perplexity ({target['evaluation']['held_out_perplexity']}) says how far it is from "
        "predicting real code. The Mistral variant was trained on the corpus alone, from scratch."
    )


def _agreement_note(results: dict[str, Any]) -> str:
    agreement = results.get("greedy_agreement_with_target")
    if agreement is None:
        return ""
    return (
        f"\nOn the held-out windows the draft's most likely next token is the target's {agreement:.1%} "
        "of the time: an estimate of how often greedy speculative decoding accepts a draft token.\n"
    )


def _what_it_does(folder: str, entry: dict[str, Any]) -> str:
    if "stage2_settings" in entry:
        return ("It completes Python code, and in the chat template it answers \"Write a function that "
                "...\" with a function (trained on pairs made from the corpus); it knows nothing else.")
    return ("It completes Python code; it knows nothing else, and its chat template only exists so that "
            "the chat APIs have something to render.")


def _origin(entry: dict[str, Any]) -> str:
    return "distilled from `pagedserve/tiny-py`" if "distillation" in entry else "trained from scratch"


def _training_script(entry: dict[str, Any]) -> str:
    return "scripts/distill_draft.py" if "distillation" in entry else "scripts/train_tiny_model.py"


def _reproduce(manifest: dict[str, Any], entry: dict[str, Any]) -> str:
    """The commands that rebuild the folder (a distilled draft: its distillation after the
    target's training, from the draft bundled before it)."""
    if "distillation" not in entry:
        return manifest["command"]
    report = entry["distillation"]
    first = report.get("init_distillation")
    first_command = first["command"].replace(" OUT", " FIRST_OUT") + "\n" if first else ""
    return (f"{manifest['command']}\n{first_command}{report['command']}\n"
            "python scripts/install_assets.py --draft OUT --acceptance LATENCY_JSON")


def render_card(folder: str, manifest: dict[str, Any], samples: list[tuple[str, str]], max_tokens: int,
                chat_samples: list[tuple[str, str]] = ()) -> str:
    """Markdown for ``folder``'s README.md; ``samples`` are (prompt, greedy completion) pairs,
    ``chat_samples`` (user message, greedy answer) pairs."""
    entry = manifest["models"][folder]
    settings = entry["settings"]
    corpus, evaluation, versions = manifest["corpus"], manifest["evaluation"], manifest["versions"]
    context = evaluation["context"]
    results = entry["evaluation"]
    unigram = manifest["tokenizer"]["unigram_perplexity"]
    sample_text = "\n\n".join(
        f"Prompt `{prompt!r}`:\n\n```python\n{prompt}{completion}\n```" for prompt, completion in samples
    ) + "".join(
        f"\n\nChat, user: {user!r}; the assistant's answer:\n\n```python\n{answer}\n```" for user, answer in chat_samples
    )
    return f"""---
license: apache-2.0
language: [code]
library_name: pagedserve
pipeline_tag: text-generation
---

# {entry['short_name']}

A tiny `{entry['architecture']}` {_origin(entry)} on the Python standard library, shipped
inside pagedserve: {ROLES[folder]}. {_what_it_does(folder, entry)}

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

Plain PyTorch on the transformers model class, `{_training_script(entry)}`:

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
{_agreement_note(results)}{_output_quality(entry)}{_acceptance(entry)}
## Samples

Greedy (temperature 0), at most {max_tokens} new tokens, generated by pagedserve itself with
this folder's weights when the card was written, unedited. A model this small falls into loops
when decoding greedily more often than when sampling (see the measurements above). End a
prompt at its last non-blank character: the tokenizer merges a newline with the indentation that
follows it, so a prompt ending in a bare newline ends in the middle of a token.

{sample_text}

## Limitations

{_limitations(manifest)}

## Reproduce

```
{_reproduce(manifest, entry)}
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
