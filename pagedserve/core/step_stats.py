"""StepStats: what the ``step_finished`` hooks (the metrics, the benchmarks) see after each
engine step."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.core.speculative import SpecDecodingStats


@dataclass
class StepStats:
    """What ``step_finished`` hooks and the metrics see after each step."""

    num_scheduled_tokens: int
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    #: The whole step, and within it the model forward alone (input preparation, sampling,
    #: scheduling and detokenization are the difference).
    step_seconds: float
    forward_seconds: float
    #: Prompt tokens of the requests whose first token came in this step (once per request).
    num_prompt_tokens: int = 0
    #: Tokens sampled in this step.
    num_generation_tokens: int = 0
    #: Sequences that computed tokens in this step (the batch size).
    num_scheduled_seqs: int = 0
    #: Tokens looked up in / found in the prefix cache during this step's scheduling.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    #: Per sequence that got its first token this step: seconds since its arrival.
    time_to_first_tokens: list[float] = field(default_factory=list)
    #: Per sequence that got a later token this step: seconds since its previous token.
    inter_token_latencies: list[float] = field(default_factory=list)
    #: LoRA adapters (names) of the running requests, and those only waiting requests ask for.
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)
    #: Speculative decoding's verification counts of this step (None without speculation).
    spec_decoding: SpecDecodingStats | None = None
