"""``pagedserve quantize --method awq``: AutoAWQ itself (extra ``pagedserve[awq]``), fed local
calibration samples, writing its GEMM layout."""

from __future__ import annotations

from pathlib import Path

import torch

from pagedserve.core.loader import load_hf_config, resolve_dtype
from pagedserve.plugins.quant.checkpoint_io import copy_side_files


def quantize_awq(source: Path, out: Path, samples: torch.Tensor, group_size: int) -> None:
    """Quantize ``source`` to 4-bit AWQ (zero point, GEMM layout) and write ``out``."""
    try:
        from awq import AutoAWQForCausalLM  # prints AutoAWQ's deprecation notice (it forces it on)
    except ImportError as exc:
        raise ValueError(
            f"--method awq uses AutoAWQ, which does not import here ({exc}); install it with "
            f"`pip install 'pagedserve[awq]'`"
        ) from exc
    from transformers import AutoTokenizer

    on_gpu = torch.cuda.is_available()
    # On the CPU float16 matmuls are emulated and AutoAWQ's search is several times slower in them.
    model = AutoAWQForCausalLM.from_pretrained(
        str(source),
        torch_dtype=torch.float16 if on_gpu else torch.float32,
        device_map="cuda" if on_gpu else "cpu",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    settings = {"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}
    model.quantize(
        tokenizer,
        quant_config=settings,
        calib_data=samples.tolist(),  # pre-tokenized windows: AutoAWQ downloads no dataset
        max_calib_samples=samples.shape[0],
        max_calib_seq_len=samples.shape[1],
    )
    # The unquantized tensors (embeddings, norms) go back to the checkpoint's dtype; the packed
    # layers' scales are float16 buffers whatever the compute dtype, as AutoAWQ writes them.
    source_dtype = resolve_dtype("auto", load_hf_config(str(source)), "cuda")
    for param in model.model.parameters():
        param.data = param.data.to(source_dtype)
    model.model.config.dtype = source_dtype
    model.save_quantized(str(out))
    copy_side_files(source, out)
