"""Qwen2: q, k and v have biases (o does not); layers from ``max_window_layers`` on may use a
sliding window (the config's ``layer_types``)."""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.decoder import DecoderForCausalLM, DecoderOptions, sliding_windows_from_config


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def decoder_options(cls, hf_config: Any) -> DecoderOptions:
        return DecoderOptions(
            hidden_act=hf_config.hidden_act,
            qkv_bias=True,
            sliding_windows=sliding_windows_from_config(hf_config, None),
        )
