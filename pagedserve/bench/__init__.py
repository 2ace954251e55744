"""Built-in plugin: the ``pagedserve bench`` commands (throughput, serve)."""

from __future__ import annotations

from typing import Any

from pagedserve.core.hookspecs import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    from pagedserve.bench.cli import bench

    cli.add_command(bench)
