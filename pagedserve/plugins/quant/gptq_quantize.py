"""``pagedserve quantize --method gptq``: GPTQ over a transformers model, layer by layer, written
in the classic GPTQ checkpoint format (``checkpoint_format: "gptq"``).

Layer by layer: the calibration activations entering a decoder layer are recorded once; within the
layer, linear layers that read the same input (q/k/v, gate/up) form a step, and the steps are
quantized in call order, each from Hessians gathered with the layer's earlier steps already
quantized (``true_sequential``). The quantized layer's outputs are the next layer's inputs, so
every layer compensates for the error of those before it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from pagedserve import __version__
from pagedserve.plugins.quant.checkpoint_io import source_tensors, write_checkpoint
from pagedserve.plugins.quant.gptq_algorithm import GPTQResult, gptq_quantize
from pagedserve.plugins.quant.packing import pack_int32

#: Calibration samples run through a layer together.
MICRO_BATCH = 8

LayerInputs = list[tuple[tuple[Any, ...], dict[str, Any]]]


class _Captured(Exception):
    """Stops the model once the first decoder layer's inputs are recorded."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ``ModuleList`` of the model's decoder layers (the list whose length is
    ``num_hidden_layers``)."""
    count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def capture_inputs(model: nn.Module, first_layer: nn.Module, samples: torch.Tensor) -> LayerInputs:
    """The (args, kwargs) the first decoder layer receives for each micro-batch of samples."""
    captured: LayerInputs = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in samples.split(MICRO_BATCH):
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    outputs = []
    for args, kwargs in inputs:
        out = layer(*args, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def sequential_steps(layer: nn.Module, inputs: LayerInputs) -> list[list[tuple[str, nn.Linear]]]:
    """The layer's linear layers in call order, grouped by the input tensor they read."""
    calls: list[tuple[str, nn.Linear, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, args, _out, name=name: calls.append((name, m, args[0])))
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        _run(layer, inputs[:1])
    finally:
        for handle in hooks:
            handle.remove()
    steps: list[list[tuple[str, nn.Linear]]] = []
    for i, (name, module, x) in enumerate(calls):
        if i and x is calls[i - 1][2]:
            steps[-1].append((name, module))
        else:
            steps.append([(name, module)])
    return steps


def collect_hessians(
    layer: nn.Module, step: list[tuple[str, nn.Linear]], inputs: LayerInputs
) -> dict[str, torch.Tensor]:
    """``H = 2 X.T X / n`` of each linear layer of ``step`` over all calibration tokens."""
    sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in step}
    counts = dict.fromkeys(sums, 0)

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name] += x.T @ x
            counts[name] += x.shape[0]

        return hook

    hooks = [module.register_forward_hook(make_hook(name)) for name, module in step]
    try:
        _run(layer, inputs)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: 2 * sums[name] / counts[name] for name in sums}


def classic_tensors(result: GPTQResult, bits: int) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros`` (stored as zero - 1), ``scales`` (float16) and ``g_idx``."""
    return {
        "qweight": pack_int32(result.values.T, bits, 0),
        "qzeros": pack_int32(result.zeros - 1, bits, 1),
        "scales": result.scales.to(torch.float16),
        "g_idx": result.g_idx,
    }


@torch.no_grad()
def quantize_gptq(
    source: Path,
    out: Path,
    samples: torch.Tensor,
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    damp: float = 0.01,
) -> None:
    """Quantize every linear layer of the decoder layers of ``source`` and write ``out``."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    prefix, layers = decoder_layers(model)
    for name, module in layers.named_modules():
        if isinstance(module, nn.Linear) and group_size != -1 and module.in_features % group_size:
            raise ValueError(
                f"group size {group_size} does not divide the {module.in_features} input features "
                f"of {prefix}.{name}; choose a divisor (or -1)"
            )
    inputs = capture_inputs(model, layers[0], samples)
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for index, layer in enumerate(tqdm(layers, desc="GPTQ layers")):
        for step in sequential_steps(layer, inputs):
            hessians = collect_hessians(layer, step, inputs)
            for name, linear in step:
                # The classic format stores zero - 1, so asymmetric zeros start at 1.
                result = gptq_quantize(
                    linear.weight, hessians[name], bits, group_size, desc_act, sym, damp,
                    min_zero=0 if sym else 1,
                )
                linear.weight.copy_(result.dequantized().to(linear.weight.dtype))
                quantized[f"{prefix}.{index}.{name}"] = classic_tensors(result, bits)
        outputs = _run(layer, inputs)
        inputs = [((hidden, *args[1:]), kwargs) for hidden, (args, kwargs) in zip(outputs, inputs)]

    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in source_tensors(source):
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            tensors.update({f"{module}.{key}": value for key, value in quantized[module].items()})
        else:
            tensors[name] = tensor
    settings = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "damp_percent": damp,
        "true_sequential": True,
        "static_groups": False,
        "lm_head": False,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": [f"pagedserve:{__version__}"]},
    }
    write_checkpoint(source, out, tensors, settings, side_config_file="quantize_config.json")
