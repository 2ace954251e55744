"""Built-in plugin: ``pagedserve plan`` (will a model fit, how many requests at once, at what cost)."""

from __future__ import annotations

from typing import Any

from pagedserve.core.hookspecs import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    from pagedserve.plan.cli import plan

    cli.add_command(plan)
