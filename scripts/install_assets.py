"""Put a retrained target and a distilled draft into ``pagedserve/assets``, with the measurements
their cards state, then rewrite the cards, samples and checksums.

    python scripts/install_assets.py --target OUT/tiny-py --target-manifest OUT/manifest.json \\
        --draft DRAFT_OUT --output-eval eval.json --acceptance latency.json

``--target`` / ``--target-manifest``: what ``train_tiny_model.py --continue-target`` wrote;
``--draft``: what ``distill_draft.py`` wrote (its held-out perplexity and agreement with the
new target are measured here); ``--output-eval``: ``eval_tiny_model.py --out`` on the installed
target (parse and repetition shares; the sampling defaults, ``GENERATION_DEFAULTS`` of
``train_tiny_model.py``, are written into the target's ``generation_config.json`` here); ``--acceptance``: a ``pagedserve
bench latency --output-json`` result of the draft. Any of them may be left out to keep what is
installed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import tokenizers
import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from train_tiny_model import (
    BOS_ID,
    CONTEXT,
    DRAFT,
    EOS_ID,
    SLICE_WINDOWS,
    TARGET,
    agreement,
    perplexity,
    write_cards_and_checksums,
    write_generation_defaults,
)

from pagedserve.assets import ASSETS_DIR, forward_flops_per_token
from pagedserve.assets.corpus import eval_windows, split_files, token_stream


def held_out_windows(folder: Path) -> list[list[int]]:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    encode = lambda text: tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    return eval_windows(token_stream(encode, split_files()[1], BOS_ID, EOS_ID), CONTEXT)


def install_target(folder: Path, manifest_path: Path, manifest: dict[str, Any]) -> None:
    shutil.rmtree(ASSETS_DIR / TARGET)
    shutil.copytree(folder, ASSETS_DIR / TARGET)
    trained = json.loads(manifest_path.read_text())
    manifest["models"][TARGET] = trained["models"][TARGET]
    manifest["stage2_command"] = trained["stage2_command"]
    settings = manifest["models"][TARGET]["stage2_settings"]
    if "versions" not in settings:  # written by a run of the script before it recorded them
        settings["versions"] = {"python": platform.python_version(), "torch": torch.__version__,
                                "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def install_draft(folder: Path, manifest: dict[str, Any]) -> None:
    report = json.loads((folder / "distillation.json").read_text())
    shutil.rmtree(ASSETS_DIR / DRAFT)
    shutil.copytree(folder, ASSETS_DIR / DRAFT)
    (ASSETS_DIR / DRAFT / "generation_config.json").write_bytes(
        (ASSETS_DIR / TARGET / "generation_config.json").read_bytes())
    windows = held_out_windows(ASSETS_DIR / DRAFT)
    draft = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / DRAFT, dtype=torch.float32).eval()
    target = AutoModelForCausalLM.from_pretrained(ASSETS_DIR / TARGET, dtype=torch.float32).eval()
    entry = manifest["models"][DRAFT]
    entry["settings"]["num_hidden_layers"] = draft.config.num_hidden_layers
    entry["parameters"] = sum(p.numel() for p in draft.parameters())
    entry["flops_per_token"] = {str(c): forward_flops_per_token(draft.config, c) for c in (0, CONTEXT)}
    entry["training"] = {"steps": report["steps"], "tokens": report["steps"] * report["batch_size"] * report["context"],
                         "wall_s": report["wall_s"], "final_train_loss": None}
    entry["distillation"] = report
    entry.pop("acceptance", None)  # measured with the weights replaced: --acceptance adds the new ones
    entry["evaluation"] = {
        "held_out_perplexity": round(perplexity(draft, windows), 3),
        "slice_perplexity": round(perplexity(draft, windows[:SLICE_WINDOWS]), 5),
        "greedy_agreement_with_target": round(agreement(draft, target, windows), 4),
    }
    print(DRAFT, json.dumps(entry["evaluation"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path)
    parser.add_argument("--target-manifest", type=Path)
    parser.add_argument("--draft", type=Path)
    parser.add_argument("--output-eval", type=Path)
    parser.add_argument("--acceptance", type=Path, action="append", default=[])
    parser.add_argument("--no-cards", action="store_true", help="write the manifest, not the cards and checksums")
    args = parser.parse_args()
    torch.set_num_threads(1)
    manifest_path = ASSETS_DIR / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if args.target:
        install_target(args.target, args.target_manifest, manifest)
        write_generation_defaults(ASSETS_DIR / TARGET)
    if args.draft:
        install_draft(args.draft, manifest)
    if args.output_eval:
        report = json.loads(args.output_eval.read_text())
        for result in report["results"]:
            result.pop("examples", None)
        installed = json.loads((ASSETS_DIR / TARGET / "generation_config.json").read_text())
        report["generation_config_defaults"] = {
            k: installed[k] for k in ("temperature", "top_p", "repetition_penalty") if k in installed}
        manifest["models"][TARGET]["output_eval"] = report
    for path in args.acceptance:
        result = json.loads(path.read_text())
        manifest["models"][DRAFT].setdefault("acceptance", {})[path.stem] = result
    if args.no_cards:
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    else:
        write_cards_and_checksums(ASSETS_DIR, manifest)


if __name__ == "__main__":
    main()
