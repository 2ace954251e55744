"""Prometheus metrics of an engine, with vLLM's names under the ``pagedserve:`` prefix.

``EngineMetrics`` is a plugin object: register it with the plugin manager (the async engine's
``observers``) and the engine fills it through its lifecycle hooks, once a step and once a
finished request, never per token. Every series carries a ``model_name`` label, as vLLM's do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pagedserve.core.hookspecs import hookimpl
from pagedserve.core.outputs import EmbeddingRequestOutput

if TYPE_CHECKING:
    from pagedserve.core.engine import LLMEngine
    from pagedserve.core.outputs import RequestOutput
    from pagedserve.core.step_stats import StepStats

PREFIX = "pagedserve:"
# fmt: off
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# fmt: on
FINISHED_REASONS = ("stop", "length", "abort")


class EngineMetrics:
    """The gauges, counters and histograms vLLM exports, in their own ``registry``."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._engine: LLMEngine | None = None

        def make(kind: type, name: str, doc: str, **kwargs: object) -> Any:
            """The metric's series for this model."""
            metric = kind(PREFIX + name, doc, ["model_name"], registry=self.registry, **kwargs)
            return metric.labels(model_name)

        self.running = make(Gauge, "num_requests_running", "Sequences running (in the batch).")
        self.waiting = make(Gauge, "num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_cache_usage = make(Gauge, "kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.")
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = make(Counter, "generation_tokens", "Generation tokens processed.")
        self.preemptions = make(Counter, "num_preemptions", "Cumulative number of preemptions.")
        self.prefix_queries = make(Counter, "prefix_cache_queries", "Prefix-cache queries, in tokens.")
        self.prefix_hits = make(Counter, "prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.ttft = make(
            Histogram, "time_to_first_token_seconds", "Time to first token in seconds.", buckets=TTFT_BUCKETS
        )
        self.itl = make(
            Histogram, "inter_token_latency_seconds", "Inter-token latency in seconds.", buckets=ITL_BUCKETS
        )
        self.e2e = make(
            Histogram,
            "e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            buckets=REQUEST_BUCKETS,
        )
        self.iteration_tokens = make(
            Histogram,
            "iteration_tokens_total",
            "Tokens computed per engine step (its count is the number of steps).",
            buckets=ITERATION_TOKEN_BUCKETS,
        )
        self.queue_time = make(
            Histogram,
            "request_queue_time_seconds",
            "Seconds a request waited before it was first scheduled.",
            buckets=REQUEST_BUCKETS,
        )
        self.spec_drafts = make(Counter, "spec_decode_num_drafts", "Speculative verification steps (drafts verified).")
        self.spec_draft_tokens = make(Counter, "spec_decode_num_draft_tokens", "Proposed tokens verified.")
        self.spec_accepted_tokens = make(Counter, "spec_decode_num_accepted_tokens", "Proposed tokens accepted.")
        per_pos = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Proposed tokens accepted, by their position in the draft.",
            ["model_name", "position"],
            registry=self.registry,
        )
        self._spec_per_pos = per_pos
        self._model_name = model_name
        success = Counter(
            PREFIX + "request_success",
            "Finished sequences, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self._model_name = model_name
        #: vLLM's LoRA info: one series whose labels name the running and waiting adapters
        #: (comma-separated) and max_lora, its value the time of the last change.
        self.lora_info = Gauge(
            PREFIX + "lora_requests_info",
            "Running and waiting LoRA adapters (labels) and the time they were last seen.",
            ["model_name", "max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=self.registry,
        )
        self._lora_labels: tuple[str, ...] | None = None

    @hookimpl
    def engine_started(self, engine: LLMEngine) -> None:
        self._engine = engine

    @hookimpl
    def step_finished(self, stats: StepStats) -> None:
        self._set_gauges(stats.num_running, stats.num_waiting, stats.kv_cache_usage)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.preemptions.inc(stats.num_preemptions)
        self.prefix_queries.inc(stats.prefix_cache_queries)
        self.prefix_hits.inc(stats.prefix_cache_hits)
        if stats.num_scheduled_tokens:
            self.iteration_tokens.observe(stats.num_scheduled_tokens)
        spec = stats.spec_decoding
        if spec is not None and spec.num_drafts:
            self.spec_drafts.inc(spec.num_drafts)
            self.spec_draft_tokens.inc(spec.num_draft_tokens)
            self.spec_accepted_tokens.inc(spec.num_accepted_tokens)
            for position, count in enumerate(spec.num_accepted_tokens_per_pos):
                self._spec_per_pos.labels(self._model_name, str(position)).inc(count)
        for seconds in stats.time_to_first_tokens:
            self.ttft.observe(seconds)
        for seconds in stats.inter_token_latencies:
            self.itl.observe(seconds)
        if self._engine is not None and self._engine.config.lora.enable_lora:
            self._set_lora_info(stats.running_lora_adapters, stats.waiting_lora_adapters)

    def _set_lora_info(self, running: list[str], waiting: list[str]) -> None:
        """Keep a single series: the previous label set is removed when the adapters change."""
        max_lora = str(self._engine.config.lora.max_loras)  # type: ignore[union-attr]
        labels = (self._model_name, max_lora, ",".join(waiting), ",".join(running))
        if labels != self._lora_labels and self._lora_labels is not None:
            self.lora_info.remove(*self._lora_labels)
        self._lora_labels = labels
        self.lora_info.labels(*labels).set_to_current_time()

    @hookimpl
    def request_finished(self, output: RequestOutput | EmbeddingRequestOutput) -> None:
        if isinstance(output, EmbeddingRequestOutput):
            self.success["stop" if output.outputs.embedding else "abort"].inc()
        else:
            for completion in output.outputs:
                self.success[completion.finish_reason or "abort"].inc()
        times = output.metrics
        if "finished_time" in times:
            self.e2e.observe(times["finished_time"] - times["arrival_time"])
        if "first_scheduled_time" in times:
            self.queue_time.observe(times["first_scheduled_time"] - times["arrival_time"])
        if self._engine is not None:
            # An abort between steps frees blocks and requests that no step will report.
            engine = self._engine
            self._set_gauges(
                engine.scheduler.num_running, engine.scheduler.num_waiting, engine.kv_cache.usage
            )

    def _set_gauges(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_cache_usage.set(kv_cache_usage)
