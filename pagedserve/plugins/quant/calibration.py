"""Calibration text for the quantizers, from local files only (nothing is downloaded).

The default is the training split of the Python standard library's sources, the corpus the
bundled models were trained on (``pagedserve.assets.corpus``); its held-out split stays unseen
for the perplexity benchmark.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from pagedserve.assets.corpus import read_document, split_files

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def calibration_files(calib_dir: Path | None) -> list[Path]:
    """The text files under ``calib_dir`` (sorted), or the standard library's training split."""
    if calib_dir is None:
        return split_files()[0]
    files = sorted(p for p in Path(calib_dir).rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {calib_dir}")
    return files


def calibration_samples(tokenizer: Any, files: list[Path], num_samples: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` token ids: windows from the starts of files taken in a fixed shuffled
    order (so the samples cover the whole set, not its alphabetical start), as many windows per
    file as needed to reach ``num_samples``. ``n`` is less only when the text runs out."""
    order = list(files)
    random.Random(0).shuffle(order)
    per_file = max(1, math.ceil(num_samples / len(order)))
    samples: list[list[int]] = []
    for path in order:
        tokens = tokenizer.encode(read_document(path), add_special_tokens=False)
        for start in range(0, min(len(tokens), per_file * seq_len) - seq_len + 1, seq_len):
            samples.append(tokens[start : start + seq_len])
        if len(samples) >= num_samples:
            break
    if not samples:
        raise ValueError(f"the calibration text holds no window of {seq_len} tokens; lower --seq-len")
    return torch.tensor(samples[:num_samples], dtype=torch.long)
