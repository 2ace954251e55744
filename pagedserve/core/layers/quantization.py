"""Weight formats: the interface a quantization plugin implements, and the unquantized default.

Model code never names a format. Each ``Linear`` asks the engine's ``QuantizationConfig`` (or
``None`` = unquantized) for a ``LinearMethod`` that creates its parameters, post-processes them
once loaded and computes ``x @ W.T + b``. Formats other than the default are plugins registered
under ``register_quantization_methods`` by their checkpoint ``quant_method`` name.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pagedserve.core.layers import cpu_gemm
from pagedserve.core.plugins import get_plugin_manager

#: ``--quantization none``: insist on an unquantized checkpoint.
NO_QUANTIZATION = "none"


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Attach loading metadata to a parameter.

    ``output_dim`` is the axis holding the output features (the axis merged layers shard along);
    ``packed_dim`` and ``pack_factor`` say that axis stores ``pack_factor`` values per element
    (packed int4 layouts), so shard offsets along it are divided by ``pack_factor``.
    ``weight_loader(param, loaded_weight, shard_index)`` replaces the layer's loading for a
    parameter that is not split along the output features (a per-shard scale, an index shared by
    the shards).
    """
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter attribute {key!r} is already set")
        setattr(param, key, value)


class LinearMethod(ABC):
    """How one linear layer stores its weight and computes its output."""

    #: The method's parameters can be split for tensor parallelism: ``create_weights`` is given
    #: this rank's sizes, and every parameter split along the input or output features carries
    #: ``input_dim`` / ``output_dim`` so the layer cuts the checkpoint tensor to fit. A format that
    #: has not been checked for this stays False and is refused with tensor_parallel_size > 1.
    supports_tensor_parallel: bool = False

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        """Register the layer's weight parameters (not the bias) on ``layer``.

        ``output_sizes`` has one entry per merged shard (q, k, v or gate, up); every parameter
        that is split along the output features must carry ``output_dim``.
        """

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 - optional
        """Repack the loaded weights for the kernel (called once, after ``load_weights``)."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x`` [..., input_size] -> [..., sum(output_sizes)]."""


class UnquantizedLinearMethod(LinearMethod):
    """A dense ``[out, in]`` weight in the model dtype, as HF checkpoints store it."""

    supports_tensor_parallel = True

    def create_weights(
        self,
        layer: nn.Module,
        input_size: int,
        output_sizes: list[int],
        params_dtype: torch.dtype,
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_sizes), input_size, dtype=params_dtype), requires_grad=False
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0})
        layer.register_parameter("weight", weight)
        cpu_gemm.no_packed_weight(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return cpu_gemm.linear(x, layer.weight, bias, layer)  # F.linear, or oneDNN on packed CPU weights


class QuantizationConfig(ABC):
    """A weight format, built from the checkpoint's ``quantization_config``."""

    #: The checkpoint's ``quant_method`` this format reads (and its registry name).
    name: str = ""

    @classmethod
    @abstractmethod
    def from_config(cls, hf_quant_config: dict[str, Any]) -> QuantizationConfig:
        """Build from the checkpoint's ``quantization_config`` (``{}`` when forcing a format
        onto an unquantized checkpoint, for formats that quantize on load)."""

    @abstractmethod
    def get_linear_method(self, layer: nn.Module, prefix: str) -> LinearMethod:
        """The method for the linear layer named ``prefix`` (e.g. ``model.layers.0.mlp.down_proj``);
        a format may return ``UnquantizedLinearMethod()`` for layers it leaves dense."""

    def get_lm_head_method(self, layer: nn.Module) -> LinearMethod | None:
        """The method for the LM head, or None (the default) to leave it dense. The head keeps its
        dense ``weight`` (a tied embedding shares it): the method's
        ``process_weights_after_loading`` adds what its ``apply`` reads beside it."""
        return None

    def get_moe_method(self, layer: nn.Module, prefix: str) -> Any | None:
        """The method for a mixture-of-experts layer's stacked experts (``FusedMoE``: see
        ``plugins/moe/layer.py`` for what it implements), or None (the default) when this format
        cannot hold experts: the layer then refuses the format with a message."""
        return None


def checkpoint_quant_config(hf_config: Any) -> dict[str, Any] | None:
    """The checkpoint's ``quantization_config`` as a dict, or None for an unquantized one."""
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        return None
    return dict(raw) if isinstance(raw, dict) else raw.to_dict()


def quant_config_from_files(folder: str | Path, name: str | None) -> dict[str, Any] | None:
    """The settings file an older tool wrote beside config.json, for checkpoints whose config.json
    has no ``quantization_config`` (AutoGPTQ's ``quantize_config.json``, AutoAWQ's
    ``quant_config.json``); None when there is none.

    A format claims file names when it registers (``config_files=[...]``). A file that names its
    ``quant_method`` is taken at its word; one that does not is read as the format claiming it,
    the configured ``name`` looked at first.
    """
    entries = get_plugin_manager().registry("quantization_methods").entries()
    entries.sort(key=lambda entry: entry.name != name)
    for entry in entries:
        for filename in entry.metadata.get("config_files", ()):
            file = Path(folder) / filename
            if file.is_file():
                settings = json.loads(file.read_text())
                settings.setdefault("quant_method", entry.name)
                return settings
    return None


def get_quantization_config(name: str | None, hf_config: Any) -> QuantizationConfig | None:
    """The weight format to build the model with; None means unquantized.

    ``name`` is the configured ``quantization``: None follows the checkpoint, ``"none"``
    requires an unquantized checkpoint, any other name must match the checkpoint's
    ``quant_method`` (or the checkpoint must be unquantized, for formats that quantize on load).
    """
    quant_dict = checkpoint_quant_config(hf_config)
    checkpoint_method = quant_dict.get("quant_method") if quant_dict else None
    if checkpoint_method is not None:
        checkpoint_method = str(checkpoint_method).lower()
    if name == NO_QUANTIZATION:
        if checkpoint_method is not None:
            raise ValueError(
                f"quantization='none' was requested but the checkpoint is quantized with "
                f"{checkpoint_method!r}; drop the quantization setting or use a dense checkpoint"
            )
        return None
    method = name if name is not None else checkpoint_method
    if method is None:
        return None
    if checkpoint_method is not None and method != checkpoint_method:
        raise ValueError(
            f"quantization={name!r} does not match the checkpoint's quant_method "
            f"{checkpoint_method!r}; set quantization={checkpoint_method!r} or leave it unset"
        )
    cls = get_plugin_manager().registry("quantization_methods").load(method)
    return cls.from_config(quant_dict or {})
