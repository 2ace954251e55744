"""HF folder or hub id -> config -> architecture (from the ``models`` registry) -> safetensors weights.

Weights load from safetensors only: pickle checkpoints (``.bin``, ``.pt``) can run arbitrary code
when loaded, so they are refused with a message saying how to convert them. Remote code is never
trusted.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from pagedserve.assets import bundled_model_path
from pagedserve.core.config import ModelConfig
from pagedserve.core.layers.quantization import (
    checkpoint_quant_config,
    get_quantization_config,
    quant_config_from_files,
)
from pagedserve.core.layers.rotary import rope_max_len, rope_parameters_from_config
from pagedserve.core.plugins import get_plugin_manager
from pagedserve.distributed import parallel_state
from pagedserve.distributed.shards import CheckpointSlice, CheckpointTensor

#: What a hub download fetches: configs, tokenizer files and safetensors weights, nothing else.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
]
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: Config keys that bound the context length, the smallest one present wins (as vLLM does).
MAX_LEN_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_seq_len",
    "seq_length",
    "max_sequence_length",
)
DEFAULT_MAX_LEN = 2048


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says what to change."""


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local folder as is; a bundled model's short name (``pagedserve/tiny-py``) as its folder
    inside the package; otherwise a hub id, downloaded (configs, tokenizer, safetensors)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    bundled = bundled_model_path(model)
    if bundled is not None:
        if not (bundled / "config.json").is_file():
            raise ModelLoadError(
                f"the bundled model {model} is missing from this installation (no {bundled}/config.json): "
                "reinstall pagedserve, or rebuild it with `python scripts/train_tiny_model.py`"
            )
        return str(bundled)
    if path.exists():
        raise ModelLoadError(f"{model} is a file; pass the folder holding config.json and the weights")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"model folder {model} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(model, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS)
    except LocalEntryNotFoundError as exc:
        raise ModelLoadError(
            f"{model!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"(offline, or not in the local cache): pass a local folder, or download it first "
            f"with `huggingface-cli download {model}`"
        ) from exc
    except (HfHubHTTPError, ValueError) as exc:
        raise ModelLoadError(
            f"{model!r} is not a local folder and the hub refused it: {exc}"
        ) from exc


def load_hf_config(path: str) -> Any:
    """The folder's ``config.json``: read by the registered model class's ``config_from_dict``
    where it has one that takes this config, else through transformers' AutoConfig (no remote
    code). The first skips importing transformers' config classes, a second of start-up."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"no config.json in {path}: is this a Hugging Face model folder?")
    try:
        config = _config_from_model_class(file)
        if config is not None:
            return config
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except ValueError as exc:
        raise ModelLoadError(f"cannot read the config in {path}: {exc}") from exc


def _config_from_model_class(file: Path) -> Any:
    """What the registered class of the config's architecture reads of it with its
    ``config_from_dict`` (None: no such class or method, or it declines this config)."""
    try:
        values = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # AutoConfig says what is wrong with the file
    architectures = values.get("architectures") if isinstance(values, dict) else None
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        return None
    registry = get_plugin_manager().registry("models")
    name = next((a for a in architectures if a in registry), None)
    reader = getattr(registry.load(name), "config_from_dict", None) if name is not None else None
    config = reader(values) if reader is not None else None
    if config is not None:
        config._name_or_path = str(file.parent)  # as AutoConfig names it
    return config


def get_model_max_len(hf_config: Any) -> int:
    """The longest context the model supports, with RoPE scaling that extends it applied."""
    lengths = [v for key in MAX_LEN_KEYS if isinstance(v := getattr(hf_config, key, None), int)]
    max_len = min(lengths, default=DEFAULT_MAX_LEN)
    _, scaling = rope_parameters_from_config(hf_config)
    max_len = rope_max_len(max_len, scaling)
    return max_len


def resolve_dtype(dtype: str, hf_config: Any, device: str) -> torch.dtype:
    """The parameter dtype: ``auto`` is the checkpoint's (``dtype`` / ``torch_dtype``), float32
    when it names none. On the CPU a half-precision checkpoint runs in bfloat16 where the CPU
    multiplies it in hardware (AMX, ``cpu_has_amx_bf16``), else in float32 (CPU float16 matmuls are
    emulated, and bfloat16 ones without AMX no faster than float32); a float32 checkpoint stays
    float32. An explicit ``float16`` on the CPU becomes float32 too."""
    if dtype == "auto":
        named = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(named, str):
            named = getattr(torch, named, None)
        resolved = named if isinstance(named, torch.dtype) else torch.float32
        if torch.device(device).type == "cpu" and resolved in (torch.float16, torch.bfloat16):
            return torch.bfloat16 if cpu_has_amx_bf16() else torch.float32
    else:
        resolved = getattr(torch, dtype)
    if resolved == torch.float16 and torch.device(device).type == "cpu":
        return torch.float32
    return resolved


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bfloat16 tiles (torch's own CPU feature detection)."""
    return bool(torch.cpu.get_capabilities().get("amx_bf16", False))


def safetensors_files(path: str) -> list[Path]:
    """The checkpoint's safetensors files: an index's shard set, ``model.safetensors``, or all."""
    folder = Path(path)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / shard_name(index, name) for name in sorted(set(weight_map.values()), key=str)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} lists shards missing from {path}: {', '.join(absent)}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); pagedserve refuses them "
            f"because unpickling can run arbitrary code. Convert once, in an environment you trust: "
            f"python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\""
        )
    raise ModelLoadError(f"no model weights (*.safetensors) in {path}")


def shard_name(index: Path, name: Any) -> str:
    """A shard file named by an index's ``weight_map``: a relative path inside the model folder.
    Checked on the name, not the resolved path: hub snapshots link their files to blobs
    elsewhere, but an index naming ``../x`` or ``/x`` is reading outside its folder."""
    path = PurePosixPath(name) if isinstance(name, str) else None
    if path is None or not path.parts or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ModelLoadError(
            f"{index} maps weights to {name!r}, which is not a file inside the model folder; "
            "an index may only name shards in its folder or below it, with '/' between folders"
        )
    return name


def iterate_weights(files: list[Path], lazy: bool = False) -> Iterator[tuple[str, CheckpointTensor]]:
    """(name, tensor) for every tensor of every file, read one at a time on the CPU. With
    ``lazy`` each comes as a ``CheckpointSlice`` that reads only the part its layer keeps (a
    tensor-parallel rank's shard)."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if lazy:
                    part = f.get_slice(name)
                    yield name, CheckpointSlice(part, tuple(part.get_shape()))
                else:
                    yield name, f.get_tensor(name)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_class(hf_config: Any) -> type[nn.Module]:
    """The registered class for the config's ``architectures`` (the first one registered)."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ModelLoadError("config.json names no architectures; cannot choose a model class")
    registry = get_plugin_manager().registry("models")
    name = next((a for a in architectures if a in registry), architectures[0])
    return registry.load(name)


def build_model(
    hf_config: Any, quantization: str | None, dtype: str, device: str | torch.device, folder: str | None = None
) -> nn.Module:
    """The registered architecture built from ``hf_config`` on ``device``, weights not loaded
    (on the ``meta`` device: every parameter's shape and dtype, no memory). ``folder`` is read
    for the settings files of older quantization tools."""
    cls = model_class(hf_config)
    if folder is not None and checkpoint_quant_config(hf_config) is None:
        side_file_settings = quant_config_from_files(folder, quantization)
        if side_file_settings is not None:
            hf_config.quantization_config = side_file_settings
    quant_config = get_quantization_config(quantization, hf_config)
    with default_dtype(resolve_dtype(dtype, hf_config, torch.device(device).type)), torch.device(device):
        return cls(hf_config, quant_config)


def load_model(model_config: ModelConfig, quantization: str | None, device: str) -> nn.Module:
    """Build the model named by ``model_config`` on ``device`` and load its weights.

    Reuses ``model_config.model_path`` and ``hf_config`` when the engine has resolved them
    already, and sets them otherwise.
    """
    if model_config.model_path is None:
        model_config.model_path = resolve_model_path(model_config.model, model_config.revision)
    if model_config.hf_config is None:
        model_config.hf_config = load_hf_config(model_config.model_path)
    path, hf_config = model_config.model_path, model_config.hf_config
    model = build_model(hf_config, quantization, model_config.dtype, device, folder=path)
    if model_config.load_format == "dummy":
        initialize_dummy_weights(model, model_config.seed)
    else:
        lazy = parallel_state.get_tp_world_size() > 1
        model.load_weights(iterate_weights(safetensors_files(path), lazy=lazy))
    for module in model.modules():
        quant_method = getattr(module, "quant_method", None)
        if quant_method is not None:
            quant_method.process_weights_after_loading(module)
    return model.eval()


def initialize_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights instead of a checkpoint: N(0, 0.02) for floating-point parameters, ones for
    norm weights. Integer (packed quantized) parameters keep what they were created with."""
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point:
            continue
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:
            generator = torch.Generator(device=param.device).manual_seed(seed + zlib.crc32(name.encode()))
            param.data.normal_(0.0, 0.02, generator=generator)


def load_generation_config(path: str) -> dict[str, Any]:
    """The folder's ``generation_config.json`` (eos ids, default sampling), or {} without one."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    return json.loads(file.read_text())
