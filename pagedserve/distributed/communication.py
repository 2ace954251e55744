"""The bytes a tensor-parallel step moves between ranks, computed from the model's shape.

Per step of ``T`` tokens with ``S`` rows of logits (sampled, verified, prompt-scored), over
``N`` ranks, with activations of ``b`` bytes:

* the vocabulary-parallel embedding and each layer's two row-parallel outputs (attention's
  ``o_proj``, the MLP's ``down_proj``) are all-reduced: ``2 L + 1`` all-reduces of ``T x hidden``;
* the LM head gathers each rank's ``S x ceil(V / N)`` logits;
* rank 0 broadcasts the step's batch (token ids, block tables: a few bytes a token, not counted).

A ring all-reduce sends ``2 (N - 1) / N`` of its payload from every rank, an all-gather
``(N - 1) / N`` of the gathered result; NCCL's and gloo's algorithms are within a small factor
of that. These are the figures docs/parallel.md tabulates.
"""

from __future__ import annotations

from typing import Any


def bytes_per_step(hf_config: Any, world_size: int, num_tokens: int, num_logits_rows: int,
                   activation_bytes: int) -> dict[str, float]:
    """Collective payloads of one step and what each rank sends for them (ring algorithms)."""
    hidden, layers = int(hf_config.hidden_size), int(hf_config.num_hidden_layers)
    vocab = int(hf_config.vocab_size)
    padded_vocab = -(-vocab // world_size) * world_size
    all_reduces = 2 * layers + 1
    all_reduce_payload = all_reduces * num_tokens * hidden * activation_bytes
    gather_payload = num_logits_rows * padded_vocab * activation_bytes
    share = (world_size - 1) / world_size
    return {
        "all_reduces": float(all_reduces),
        "all_reduce_payload_bytes": float(all_reduce_payload),
        "logits_gather_bytes": float(gather_payload),
        "sent_per_rank_bytes": 2 * share * all_reduce_payload + share * gather_payload,
    }
