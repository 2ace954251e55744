"""Mistral: Llama's code with the config's ``sliding_window`` on every attention layer."""

from __future__ import annotations

from typing import Any

from pagedserve.plugins.models.llama.model import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def sliding_window(cls, hf_config: Any) -> int | None:
        """The config's window (a query sees its last ``sliding_window`` keys); None = full."""
        return getattr(hf_config, "sliding_window", None)
