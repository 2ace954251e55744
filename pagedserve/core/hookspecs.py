"""Every extension point of pagedserve, as pluggy hook specifications.

Two kinds of hooks exist, and neither is ever called per layer or per token:

* Registration hooks run once when the plugin manager starts. Each receives a ``register``
  callback taking ``(name, target, **metadata)`` where ``target`` is a lazy ``"module:attr"``
  string (so ``pagedserve --help`` never imports torch). Registering the same name with the same
  target twice is harmless; the same name with a different target is an error that names both.
* Lifecycle hooks run when the engine starts or stops, once per engine step at most, and once
  per finished request.

A plugin module implements any subset of these with ``@pagedserve.hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import click

    from pagedserve.core.engine import LLMEngine
    from pagedserve.core.outputs import RequestOutput
    from pagedserve.core.step_stats import StepStats

hookspec = pluggy.HookspecMarker("pagedserve")
hookimpl = pluggy.HookimplMarker("pagedserve")


class Register(Protocol):
    """The callback handed to every ``register_*`` hook."""

    def __call__(self, name: str, target: str, **metadata: Any) -> None: ...


# --- the three core parts -------------------------------------------------------------------


@hookspec
def register_scheduling_policies(register: Register) -> None:
    """Register scheduling policies: classes implementing ``core.policies.SchedulingPolicy``.

    A policy orders the waiting queue and picks the request to preempt when KV blocks run out.
    Built in: ``fcfs`` (arrival order; preempt the latest started) and ``priority`` (lowest
    ``priority`` value first, then arrival; preempt the lowest priority, latest arrival).
    Selected by ``SchedulerConfig.policy``.
    """


@hookspec
def register_prefix_hash_functions(register: Register) -> None:
    """Register block hash functions ``(parent_hash, token_ids, extra_keys) -> bytes``.

    The KV-cache manager hashes each full block as a chain through this function to find
    reusable prefixes. Built in: ``sha256`` (collision resistant, the default) and ``builtin``
    (Python's ``hash``, faster, process-local). Selected by ``CacheConfig.prefix_hash``.
    """


@hookspec
def register_eviction_policies(register: Register) -> None:
    """Register eviction policies: classes implementing ``core.policies.EvictionPolicy``.

    The policy holds the free blocks and decides which one is reused next (and so which cached
    prefix is evicted). Built in: ``lru``. Selected by ``CacheConfig.eviction_policy``.
    """


@hookspec
def register_model_runners(register: Register) -> None:
    """Register model runners, one per device family, as vLLM's platform plugins do.

    ``register(name, "module:Class", device_types=("cpu", "cuda"))``: the engine picks the
    runner registered for the configured device type (``DeviceConfig.device``), or the one named
    by ``DeviceConfig.model_runner``. A runner class takes an ``EngineConfig`` and implements
    ``core.model_runner.ModelRunnerBase``.
    """


# --- registries filled once at start-up -------------------------------------------------------


@hookspec
def register_models(register: Register) -> None:
    """Register model architectures by their ``config.json`` ``architectures`` name.

    ``register("LlamaForCausalLM", "pkg.module:LlamaForCausalLM")``. A model class is built as
    ``cls(hf_config, quant_config)`` and implements ``forward(input_ids, positions)``,
    ``compute_logits(hidden_states)`` and ``load_weights(weights)``.
    """


@hookspec
def register_attention_backends(register: Register) -> None:
    """Register attention backends: subclasses of ``core.layers.attention.AttentionBackend``.

    ``register(name, "module:Class", priority=int)``. With no ``attention_backend`` configured,
    the engine takes, among the backends whose ``supports(config)`` returns ``None``, the one with
    the highest priority (ties broken by name).
    """


@hookspec
def register_quantization_methods(register: Register) -> None:
    """Register weight formats: classes implementing ``core.layers.quantization.QuantizationConfig``.

    The name is the checkpoint's ``quantization_config.quant_method`` (or ``"none"``).
    """


@hookspec
def register_samplers(register: Register) -> None:
    """Register samplers: classes implementing ``core.sampling.Sampler`` (``default`` is built in)."""


@hookspec
def register_logits_processors(register: Register) -> None:
    """Register batch-level logits processors (``core.sampling.LogitsProcessor``).

    ``register(name, "module:Class", order=int)``. The sampler applies every registered processor
    to each step's logits in ascending ``order``; a processor reads what it needs from the
    requests' ``SamplingParams`` (``extra_args`` for third-party options) and leaves the other
    rows untouched. Its optional ``prepare_request(request, tokenizer)`` runs when a request is
    added: a ValueError refuses the request, and a returned future keeps it waiting (others
    run) until done, as the grammar backend of structured output compiles off the engine loop.
    """


@hookspec
def register_speculative_proposers(register: Register) -> None:
    """Register speculative-decoding proposers (draft model, n-gram) by method name."""


@hookspec
def register_lora_formats(register: Register) -> None:
    """Register LoRA adapter formats (loaders of adapter folders) by name."""


@hookspec
def register_tool_parsers(register: Register) -> None:
    """Register tool-call parsers for ``tool_choice="auto"`` (``--tool-call-parser NAME``):
    subclasses of ``plugins.structured.tool_parsers.ToolParser``, which find the tool calls in a
    model's output text. Built in: ``hermes`` and ``llama3_json``.
    """


@hookspec
def register_routes(register: Register) -> None:
    """Register extra HTTP routers for ``pagedserve serve`` (``"module:router"`` of FastAPI)."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``pagedserve`` command line (a ``click.Group``)."""


# --- lifecycle -----------------------------------------------------------------------------


@hookspec
def engine_started(engine: LLMEngine) -> None:
    """The engine finished building its model, KV cache and scheduler."""


@hookspec
def step_finished(stats: StepStats) -> None:
    """One engine step ended; ``stats`` holds its counts and timings. Called at most once a step."""


@hookspec
def request_finished(output: RequestOutput) -> None:
    """A request finished (stopped, hit its length limit, or was aborted)."""


@hookspec
def engine_shutdown(engine: LLMEngine) -> None:
    """The engine is shutting down and will not step again."""
