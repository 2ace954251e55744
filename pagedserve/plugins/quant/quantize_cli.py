"""``pagedserve quantize MODEL OUT --method awq|gptq|fp8``."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _check_settings(method: str, bits: int, group_size: int) -> None:
    if method == "awq":
        from pagedserve.plugins.quant.awq import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
    elif method == "gptq":
        from pagedserve.plugins.quant.gptq import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
    else:
        return
    if bits not in SUPPORTED_BITS:
        supported = ", ".join(map(str, SUPPORTED_BITS))
        raise click.BadParameter(f"{method} supports {supported} bits", param_hint="--bits")
    if group_size not in SUPPORTED_GROUP_SIZES:
        supported = ", ".join(map(str, SUPPORTED_GROUP_SIZES))
        raise click.BadParameter(f"{method} supports group sizes {supported}", param_hint="--group-size")


@click.command()
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["awq", "gptq", "fp8"]), required=True)
@click.option("--bits", type=int, default=4, show_default=True, help="AWQ: 4. GPTQ: 4 or 8.")
@click.option("--group-size", type=int, default=128, show_default=True,
              help="Input features sharing a scale and zero: 32, 64, 128 (GPTQ also -1, one per row).")
@click.option("--desc-act/--no-desc-act", default=True, show_default=True, help="GPTQ act-order.")
@click.option("--sym/--asym", default=True, show_default=True, help="GPTQ symmetric zero points.")
@click.option("--damp", type=float, default=0.01, show_default=True, help="GPTQ Hessian dampening.")
@click.option("--fp8-scales", type=click.Choice(["channel", "tensor"]), default="channel", show_default=True)
@click.option("--calib-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of local text files to calibrate on [default: the Python standard library].")
@click.option("--num-samples", type=int, default=128, show_default=True, help="Calibration windows.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Tokens per calibration window.")
def quantize(model: str, out: Path, method: str, bits: int, group_size: int, desc_act: bool, sym: bool,
             damp: float, fp8_scales: str, calib_dir: Path | None, num_samples: int, seq_len: int) -> None:
    """Quantize MODEL (an HF folder or hub id) into the folder OUT with AWQ, GPTQ or FP8."""
    _check_settings(method, bits, group_size)
    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} exists and is not empty; choose a new folder")
    from pagedserve.core.loader import ModelLoadError, resolve_model_path

    try:
        source = Path(resolve_model_path(model))
        if "quantization_config" in json.loads((source / "config.json").read_text()):
            raise ValueError(f"{model} is already quantized; start from an unquantized checkpoint")
        if method == "fp8":
            from pagedserve.plugins.quant.fp8_quantize import quantize_fp8_checkpoint

            quantize_fp8_checkpoint(source, out, per_channel=fp8_scales == "channel")
        else:
            from transformers import AutoTokenizer

            from pagedserve.plugins.quant.calibration import calibration_files, calibration_samples

            tokenizer = AutoTokenizer.from_pretrained(source)
            samples = calibration_samples(tokenizer, calibration_files(calib_dir), num_samples, seq_len)
            if method == "awq":
                from pagedserve.plugins.quant.awq_quantize import quantize_awq

                quantize_awq(source, out, samples, group_size)
            else:
                from pagedserve.plugins.quant.gptq_quantize import quantize_gptq

                quantize_gptq(source, out, samples, bits, group_size, desc_act, sym, damp)
    except (ValueError, ModelLoadError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {method} checkpoint to {out}")
