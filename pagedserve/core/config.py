"""EngineConfig and its parts, validated at construction with messages that say what to change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedserve.core.pooling import PoolerConfig

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "dummy")
#: "auto": the model's dtype; "fp8": float8 e4m3 with a per-tensor scale for K and for V.
KV_CACHE_DTYPES = ("auto", "fp8")


class ConfigError(ValueError):
    """An invalid setting; the message names the setting and what it accepts."""


def _positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class ModelConfig:
    """Which model to load and how: a local HF folder, a bundled short name or a hub id."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    seed: int = 0
    revision: str | None = None
    served_model_name: str | None = None
    #: "auto": the checkpoint's safetensors; "dummy": random weights, no checkpoint read (for
    #: benchmarks of model shapes that are not at hand, as vLLM's ``load_format="dummy"``).
    load_format: str = "auto"
    #: How embeddings are pooled (vLLM's ``pooler_config``): a ``PoolerConfig`` or its dict.
    pooler_config: PoolerConfig | dict[str, Any] | None = None
    #: Filled by the loader: the transformers config and the resolved folder.
    hf_config: Any = field(default=None, repr=False)
    model_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError("model must be a path or model id (a non-empty string)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _positive("max_model_len", self.max_model_len, allow_none=True)
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        try:
            self.pooler_config = PoolerConfig.of(self.pooler_config)
        except ValueError as exc:
            raise ConfigError(f"pooler_config: {exc}") from exc


@dataclass
class CacheConfig:
    """The paged KV cache: block size, capacity and prefix caching."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    prefix_hash: str = "sha256"
    eviction_policy: str = "lru"
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        if self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        _positive("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        _positive("kv_cache_memory_bytes", self.kv_cache_memory_bytes, allow_none=True)
        if self.num_kv_blocks is not None and self.kv_cache_memory_bytes is not None:
            raise ConfigError("set num_kv_blocks or kv_cache_memory_bytes, not both")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}"
            )


@dataclass
class SchedulerConfig:
    """One token budget a step; chunked prefill is always on."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)


@dataclass
class DeviceConfig:
    """Where the model runs: ``auto`` is CUDA when available, else the CPU."""

    device: str = "auto"
    model_runner: str | None = None

    def resolved(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ParallelConfig:
    """Tensor parallelism: ``tensor_parallel_size`` ranks (rank 0 in the engine's process, the
    others spawned), spread evenly over ``nnodes`` machines. Ranks meet at
    ``master_addr:master_port`` (defaults: ``$MASTER_ADDR`` / ``$MASTER_PORT``, else loopback and a
    free port, which only a single machine can use). See docs/parallel.md."""

    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    def __post_init__(self) -> None:
        import os

        _positive("tensor_parallel_size", self.tensor_parallel_size)
        _positive("nnodes", self.nnodes)
        if self.tensor_parallel_size % self.nnodes:
            raise ConfigError(
                f"tensor_parallel_size ({self.tensor_parallel_size}) must be a multiple of nnodes "
                f"({self.nnodes}): every machine runs the same number of ranks"
            )
        if not isinstance(self.node_rank, int) or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank!r}")
        if self.master_addr is None:
            self.master_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if self.master_port is None and os.environ.get("MASTER_PORT"):
            self.master_port = int(os.environ["MASTER_PORT"])
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"master_port must be a TCP port (1-65535), got {self.master_port!r}")
        if self.nnodes > 1 and self.master_port is None:
            raise ConfigError(
                "nnodes > 1 needs master_port (or $MASTER_PORT), the same on every machine, and "
                "master_addr (or $MASTER_ADDR) set to the address of the machine with node_rank 0"
            )

    def local_ranks(self) -> list[int]:
        """The ranks this machine runs."""
        per_node = self.tensor_parallel_size // self.nnodes
        return list(range(self.node_rank * per_node, (self.node_rank + 1) * per_node))


#: vLLM speculative_config keys pagedserve does not implement: refused, never ignored.
_UNSUPPORTED_SPEC_KEYS = {
    "draft_tensor_parallel_size": "the draft runs with the target's parallelism",
    "quantization": "the draft loads its checkpoint's own format",
    "max_model_len": "the draft uses the target's max_model_len",
    "revision": "give a local folder or a bundled short name as model",
    "code_revision": "remote code is never run",
    "speculative_token_tree": "tree verification is not implemented; proposals are one chain",
    "disable_padded_drafter_batch": "the draft batch is never padded",
}
#: Methods under vLLM's names that pagedserve's built-ins do not provide (a plugin may).
SPEC_METHOD_ALIASES = {"[ngram]": "ngram", "draft": "draft_model"}


@dataclass
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``speculative_config``): a proposer plugin ``method``
    suggests up to ``num_speculative_tokens`` tokens a step, which the target verifies in one
    forward. Method-specific options keep vLLM's names."""

    method: str
    num_speculative_tokens: int
    #: draft_model: the draft's folder or short name (default: the target's bundled draft).
    model: str | None = None
    #: ngram: the shortest and longest n-gram looked up in the request's own tokens.
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    #: Speculate only while at most this many sequences run (above it, plain decoding is
    #: faster: see docs/speculative.md). None: the proposer's measured default; 0: never off.
    disable_by_batch_size: int | None = None
    #: suffix: depth of the suffix trees, requests whose outputs stay in the global cache,
    #: most tokens proposed per matched token, and the least probability a proposed token has.
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 1000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1
    #: draft_model (not a vLLM key; vLLM always drafts k): the draft stops after proposing a
    #: token it gave less than this probability, saving the forwards whose proposals would
    #: most likely be rejected; 0 always drafts ``num_speculative_tokens``.
    draft_confidence_threshold: float = 0.4
    #: draft_model: vLLM's override of the engine's ``enforce_eager`` for the draft. On the CPU
    #: the draft's one-token decode steps are compiled by default even when the target runs
    #: eagerly (a step of a small draft is nearly all per-op overhead; docs/speculative.md),
    #: falling back to eager with a warning where compiling fails. True: always eager; False:
    #: compiled, and a failure to compile is an error.
    enforce_eager: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(
                "speculative_config needs a 'method' (ngram, suffix, draft_model or a plugin's)"
            )
        self.method = SPEC_METHOD_ALIASES.get(self.method, self.method)
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 16:
            raise ConfigError(
                f"speculative_config num_speculative_tokens must be an integer in [1, 16], got {k!r}"
            )
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            _positive(f"speculative_config {name}", getattr(self, name), allow_none=True)
        if self.prompt_lookup_min is None and self.prompt_lookup_max is not None:
            self.prompt_lookup_min = min(self.prompt_lookup_max, 1)
        if self.prompt_lookup_max is None and self.prompt_lookup_min is not None:
            self.prompt_lookup_max = max(self.prompt_lookup_min, 3)
        if self.method == "ngram":
            self.prompt_lookup_min = self.prompt_lookup_min or 1
            self.prompt_lookup_max = self.prompt_lookup_max or 3
        if (self.prompt_lookup_min or 0) > (self.prompt_lookup_max or 0):
            raise ConfigError(
                f"speculative_config prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        d = self.disable_by_batch_size
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 0):
            raise ConfigError(
                f"speculative_config disable_by_batch_size must be an integer >= 0, got {d!r}"
            )
        _positive("speculative_config suffix_decoding_max_tree_depth", self.suffix_decoding_max_tree_depth)
        _positive(
            "speculative_config suffix_decoding_max_cached_requests",
            self.suffix_decoding_max_cached_requests,
        )
        if not self.suffix_decoding_max_spec_factor > 0:
            raise ConfigError("speculative_config suffix_decoding_max_spec_factor must be > 0")
        if not 0.0 <= self.suffix_decoding_min_token_prob <= 1.0:
            raise ConfigError("speculative_config suffix_decoding_min_token_prob must be in [0, 1]")
        threshold = self.draft_confidence_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ConfigError("speculative_config draft_confidence_threshold must be in [0, 1] (0: always draft k)")
        if self.enforce_eager is not None and not isinstance(self.enforce_eager, bool):
            raise ConfigError(f"speculative_config enforce_eager must be true or false, got {self.enforce_eager!r}")
        if self.enforce_eager is not None and self.method != "draft_model":
            raise ConfigError(
                f"speculative_config enforce_eager applies to method 'draft_model' (its draft's steps), "
                f"not {self.method!r}, which runs no model: drop it"
            )
        if self.model is not None and self.method != "draft_model":
            raise ConfigError(
                f"speculative_config model is the draft of method 'draft_model', not {self.method!r}; "
                "drop model or set method to draft_model"
            )

    @classmethod
    def from_value(cls, value: Any) -> SpeculativeConfig | None:
        """A SpeculativeConfig, a dict of vLLM's keys or its JSON text (the CLI's form)."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ConfigError(
                "speculative_config must be a dict such as "
                '{"method": "ngram", "num_speculative_tokens": 4}, '
                f"got {type(value).__name__}"
            )
        known = {f for f in cls.__dataclass_fields__}
        for key in value:
            if key in _UNSUPPORTED_SPEC_KEYS:
                raise ConfigError(
                    f"speculative_config {key!r} is not supported: {_UNSUPPORTED_SPEC_KEYS[key]}; "
                    "remove it"
                )
            if key not in known:
                import difflib

                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown speculative_config key {key!r}{hint}")
        if "num_speculative_tokens" not in value:
            raise ConfigError("speculative_config needs num_speculative_tokens (for example 4)")
        return cls(**{"method": value.get("method", "")} | value)


@dataclass
class LoRAConfig:
    """Multi-LoRA serving (vLLM's names): up to ``max_loras`` adapters share a step, each of
    rank at most ``max_lora_rank``; ``max_cpu_loras`` loaded adapters are kept in memory."""

    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    #: None: as many as ``max_loras``.
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise ConfigError(f"enable_lora must be true or false, got {self.enable_lora!r}")
        _positive("max_loras", self.max_loras)
        _positive("max_lora_rank", self.max_lora_rank)
        _positive("max_cpu_loras", self.max_cpu_loras, allow_none=True)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                f"({self.max_loras}): every adapter in a slot is also kept in memory"
            )


@dataclass
class EngineConfig:
    """Everything the engine needs, in one object."""

    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    attention_backend: str | None = None
    #: The registered sampler that picks tokens (``register_samplers``).
    sampler: str = "default"
    #: Logits processors beyond the registered ones (vLLM's ``logits_processors``), as
    #: ``"module:Class"`` or ``"module.Class"``; they run after the registered ones, in this order.
    logits_processors: list[str] = field(default_factory=list)
    quantization: str | None = None
    #: Compile the model forward with ``torch.compile`` (attention stays one opaque op): fewer,
    #: fused kernels a step, at the cost of compiling at start-up. Off by default, unlike vLLM,
    #: because on a small CPU the compile time outweighs short runs.
    torch_compile: bool = False
    speculative: SpeculativeConfig | None = None
    #: vLLM's ``enforce_eager``: never capture CUDA graphs (every step runs eagerly).
    enforce_eager: bool = False
    #: vLLM's ``cuda_graph_sizes``: the batch sizes decode steps are padded to and captured at
    #: (one value N: 1, 2, 4, the multiples of 8 up to N, and N). None: up to ``max_num_seqs``.
    #: Given on the CPU, decode steps are padded the same way without capture (see
    #: ``core/cuda_graphs.py``).
    cuda_graph_sizes: list[int] | None = None
    #: vLLM's ``compilation_config`` (``-O``): a level, or ``{"level": N}``. 0 (the default):
    #: decode steps run eagerly on the CPU. 3: on the CPU, each padded decode size is one
    #: static-shape inductor graph (``core/compiled_decode.py``), compiled at start-up. Read
    #: into ``compilation_level`` and, from vLLM's ``inductor_compile_config`` key (inductor's
    #: own options, e.g. ``{"freezing": true}``), ``inductor_compile_config``; levels 1 and 2
    #: and other keys are refused.
    compilation_config: int | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.speculative = SpeculativeConfig.from_value(self.speculative)
        self.compilation_level = compilation_level(self.compilation_config)
        self.inductor_compile_config = inductor_compile_config(self.compilation_config, self.compilation_level)
        if self.compilation_level and self.enforce_eager:
            raise ConfigError(
                "enforce_eager runs every step eagerly, so it cannot be combined with compilation_config "
                f"level {self.compilation_level}; drop one of them"
            )
        if not isinstance(self.enforce_eager, bool):
            raise ConfigError(f"enforce_eager must be true or false, got {self.enforce_eager!r}")
        if self.cuda_graph_sizes is not None:
            sizes = list(self.cuda_graph_sizes)
            if not sizes:
                raise ConfigError("cuda_graph_sizes must hold at least one batch size (or be left unset)")
            for size in sizes:
                _positive("every cuda_graph_sizes entry", size)
            self.cuda_graph_sizes = sizes
        if not isinstance(self.sampler, str) or not self.sampler:
            raise ConfigError(f"sampler must be a registered sampler's name, got {self.sampler!r}")
        if isinstance(self.logits_processors, str) or not all(
            isinstance(p, str) and ("." in p or ":" in p) for p in self.logits_processors
        ):
            raise ConfigError(
                "logits_processors must be a list of qualified class names such as "
                f"'my_pkg.processors:MyProcessor', got {self.logits_processors!r}"
            )
        self.logits_processors = list(self.logits_processors)
        if self.parallel.tensor_parallel_size > 1:
            refused = [
                name
                for name, on in (
                    ("enable_lora", self.lora.enable_lora),
                    ("speculative_config", self.speculative is not None),
                    ("torch_compile", self.torch_compile),
                    ("compilation_config", bool(self.compilation_level)),
                )
                if on
            ]
            if refused:
                raise ConfigError(
                    f"{', '.join(refused)} cannot be combined with tensor_parallel_size > 1 yet; "
                    "drop it or use tensor_parallel_size=1"
                )
        if self.lora.enable_lora and self.torch_compile:
            raise ConfigError(
                "enable_lora does not work with torch_compile yet (the LoRA slots change between "
                "steps); drop one of them"
            )

    def finalize(self, model_max_len: int) -> None:
        """Settle the settings that depend on the model (called once the HF config is read)."""
        if self.model.max_model_len is None:
            self.model.max_model_len = model_max_len
        elif self.model.max_model_len > model_max_len:
            raise ConfigError(
                f"max_model_len={self.model.max_model_len} exceeds the model's maximum "
                f"context ({model_max_len}); lower max_model_len"
            )
        sched = self.scheduler
        if sched.max_num_batched_tokens is None:
            sched.max_num_batched_tokens = max(2048, sched.max_num_seqs)
        if sched.max_num_batched_tokens < sched.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({sched.max_num_seqs}) so every running request can decode"
            )


#: What each supported ``compilation_config`` level does (vLLM's levels; 1 and 2 are not offered).
COMPILATION_LEVELS = {
    0: "no compilation",
    3: "the CPU decode step compiled by inductor, one static-shape graph per padded batch size",
}


def compilation_level(value: int | dict[str, Any] | None) -> int:
    """The level of a ``compilation_config`` (an int, ``{"level": N}``, or None for 0)."""
    if value is None:
        return 0
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"level", "inductor_compile_config"})
        if unknown:
            raise ConfigError(
                f"compilation_config keys {unknown} are not supported; pagedserve reads only 'level' "
                "and 'inductor_compile_config'"
            )
        value = value.get("level", 0)
    if isinstance(value, bool) or not isinstance(value, int) or value not in COMPILATION_LEVELS:
        offered = "; ".join(f"{level}: {what}" for level, what in COMPILATION_LEVELS.items())
        raise ConfigError(f"compilation_config level {value!r} is not supported (offered: {offered})")
    return value


def inductor_compile_config(value: int | dict[str, Any] | None, level: int) -> dict[str, Any]:
    """vLLM's ``compilation_config["inductor_compile_config"]``: inductor options for the
    compiled decode step (checked by inductor itself when it compiles); only with level 3."""
    options = value.get("inductor_compile_config") if isinstance(value, dict) else None
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise ConfigError(
            f"compilation_config inductor_compile_config must be an object of inductor options "
            f'(e.g. {{"freezing": true}}), got {options!r}'
        )
    if level != 3:
        raise ConfigError(
            "compilation_config inductor_compile_config needs level 3 (only the compiled CPU decode step "
            "reads it); add \"level\": 3"
        )
    return dict(options)


#: Flat (vLLM-style) argument names -> (part of EngineConfig, field).
_FLAT_ARGS: dict[str, tuple[str | None, str]] = {
    "tokenizer": ("model", "tokenizer"),
    "dtype": ("model", "dtype"),
    "max_model_len": ("model", "max_model_len"),
    "seed": ("model", "seed"),
    "revision": ("model", "revision"),
    "served_model_name": ("model", "served_model_name"),
    "load_format": ("model", "load_format"),
    "pooler_config": ("model", "pooler_config"),
    "block_size": ("cache", "block_size"),
    "num_kv_blocks": ("cache", "num_kv_blocks"),
    "kv_cache_memory_bytes": ("cache", "kv_cache_memory_bytes"),
    "gpu_memory_utilization": ("cache", "gpu_memory_utilization"),
    "enable_prefix_caching": ("cache", "enable_prefix_caching"),
    "prefix_hash": ("cache", "prefix_hash"),
    "eviction_policy": ("cache", "eviction_policy"),
    "kv_cache_dtype": ("cache", "kv_cache_dtype"),
    "max_num_seqs": ("scheduler", "max_num_seqs"),
    "max_num_batched_tokens": ("scheduler", "max_num_batched_tokens"),
    "scheduling_policy": ("scheduler", "policy"),
    "device": ("device", "device"),
    "model_runner": ("device", "model_runner"),
    "tensor_parallel_size": ("parallel", "tensor_parallel_size"),
    "nnodes": ("parallel", "nnodes"),
    "node_rank": ("parallel", "node_rank"),
    "master_addr": ("parallel", "master_addr"),
    "master_port": ("parallel", "master_port"),
    "enable_lora": ("lora", "enable_lora"),
    "max_loras": ("lora", "max_loras"),
    "max_lora_rank": ("lora", "max_lora_rank"),
    "max_cpu_loras": ("lora", "max_cpu_loras"),
    "attention_backend": (None, "attention_backend"),
    "sampler": (None, "sampler"),
    "logits_processors": (None, "logits_processors"),
    "quantization": (None, "quantization"),
    "torch_compile": (None, "torch_compile"),
    "speculative_config": (None, "speculative"),
    "enforce_eager": (None, "enforce_eager"),
    "cuda_graph_sizes": (None, "cuda_graph_sizes"),
    "compilation_config": (None, "compilation_config"),
}


def engine_config_from_args(model: str, **kwargs: Any) -> EngineConfig:
    """Build an EngineConfig from vLLM's flat argument names (``LLM(...)``, the CLI flags)."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}, "device": {}, "parallel": {}, "lora": {}}
    top: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name not in _FLAT_ARGS:
            import difflib

            close = difflib.get_close_matches(name, _FLAT_ARGS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown engine argument {name!r}{hint}")
        if value is None and name not in ("attention_backend", "quantization"):
            continue
        part, field_name = _FLAT_ARGS[name]
        (top if part is None else parts[part])[field_name] = value
    return EngineConfig(
        model=ModelConfig(model=model, **parts["model"]),
        cache=CacheConfig(**parts["cache"]),
        scheduler=SchedulerConfig(**parts["scheduler"]),
        device=DeviceConfig(**parts["device"]),
        parallel=ParallelConfig(**parts["parallel"]),
        lora=LoRAConfig(**parts["lora"]),
        **top,
    )
