"""Structured output: the xgrammar grammar backend (a logits processor) and the tool-call parsers.

Only registrations here: xgrammar is imported when the engine builds its sampler.
"""

from __future__ import annotations

from pagedserve.core.hookspecs import Register, hookimpl

_PACKAGE = "pagedserve.plugins.structured"


@hookimpl
def register_logits_processors(register: Register) -> None:
    # Last: bias and penalties cannot give back a token the grammar forbids (-inf stays -inf).
    register("structured_outputs", f"{_PACKAGE}.processor:StructuredOutputsProcessor", order=100)


@hookimpl
def register_tool_parsers(register: Register) -> None:
    register("hermes", f"{_PACKAGE}.tool_parsers:HermesToolParser")
    register("llama3_json", f"{_PACKAGE}.tool_parsers:Llama3JsonToolParser")
