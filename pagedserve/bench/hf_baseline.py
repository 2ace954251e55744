"""The naive baselines, run with transformers on the same model, prompts and lengths: ``generate``
one request at a time, and ``generate`` in padded static batches (each batch runs until its
longest request is done, and only the requested tokens count)."""

from __future__ import annotations

import time
from typing import Any

import torch

from pagedserve.bench.workload import BenchRequest


def load_hf_model(model_path: str, dtype: torch.dtype, device: str, random_weights: bool = False) -> Any:
    """transformers' model of the same folder; with ``random_weights`` (pagedserve's
    ``load_format="dummy"``) built from its config alone, as no checkpoint is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_weights:  # initialised where it runs: an 8B shape's random init takes a minute on a CPU
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device).eval()


def _generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    # min_new_tokens = max_new_tokens: the same exact lengths as pagedserve's ignore_eos.
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
    )


@torch.inference_mode()
def hf_sequential(model: Any, workload: list[BenchRequest]) -> dict[str, Any]:
    device = model.device
    start = time.perf_counter()
    tokens = 0
    for request in workload:
        ids = torch.tensor([request.prompt_token_ids], device=device)
        out = _generate(model, ids, torch.ones_like(ids), request.output_len)
        tokens += out.shape[1] - ids.shape[1]
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed}


@torch.inference_mode()
def hf_static_batches(model: Any, workload: list[BenchRequest], batch_size: int) -> dict[str, Any]:
    """Batches of ``batch_size`` in arrival order, prompts left-padded to the batch's longest."""
    device = model.device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    start = time.perf_counter()
    useful = generated = 0
    for first in range(0, len(workload), batch_size):
        batch = workload[first : first + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            n = len(request.prompt_token_ids)
            ids[row, width - n :] = torch.tensor(request.prompt_token_ids)
            mask[row, width - n :] = 1
        new_tokens = max(r.output_len for r in batch)
        out = _generate(model, ids.to(device), mask.to(device), new_tokens)
        generated += (out.shape[1] - width) * len(batch)
        useful += sum(r.output_len for r in batch)
    elapsed = time.perf_counter() - start
    return {
        "elapsed_s": elapsed,
        "output_tokens": useful,
        "generated_tokens_incl_padding": generated,
        "output_tokens_per_s": useful / elapsed,
        "batch_size": batch_size,
    }
