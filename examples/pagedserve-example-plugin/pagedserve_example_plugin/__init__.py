"""A worked example of a pagedserve plugin (see docs/plugins.md).

This module holds registrations only and imports neither torch nor FastAPI: each target is a
lazy ``"module:attr"`` string, imported when the engine (or the server) first uses it.
"""

from __future__ import annotations

from typing import Any

from pagedserve import hookimpl


@hookimpl
def register_logits_processors(register: Any) -> None:
    # order: after the built-in allowed/bad-words masks (1, 2), before logit_bias (10).
    register("banned_tokens", "pagedserve_example_plugin.processors:BannedTokensProcessor", order=5)


@hookimpl
def register_samplers(register: Any) -> None:
    register("argmax", "pagedserve_example_plugin.sampler:ArgmaxSampler")


@hookimpl
def register_routes(register: Any) -> None:
    register("example", "pagedserve_example_plugin.routes:router")


@hookimpl
def register_commands(cli: Any) -> None:
    from pagedserve_example_plugin.command import banned_ids

    cli.add_command(banned_ids)
