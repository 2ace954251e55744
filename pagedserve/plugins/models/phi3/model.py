"""Phi-3: Llama's layers, but the checkpoint stores ``qkv_proj`` and ``gate_up_proj`` as single
fused tensors (loaded shard by shard into the same merged layers, see ``checkpoint``); LongRoPE
(``longrope``, formerly ``su``) scaling and a partial rotary factor come from the config."""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.decoder import DecoderForCausalLM, DecoderOptions, sliding_windows_from_config


class Phi3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions(
            hidden_act=hf_config.hidden_act,
            sliding_windows=sliding_windows_from_config(hf_config, getattr(hf_config, "sliding_window", None)),
        )
