"""Built-in plugin: the ``pagedserve quantize`` command.

The weight formats themselves are the sibling plugins ``awq_plugin``, ``gptq_plugin`` and
``fp8_plugin``, each its own entry point. Registrations only: nothing here imports torch.
"""

from __future__ import annotations

from typing import Any

from pagedserve.core.hookspecs import hookimpl


@hookimpl
def register_commands(cli: Any) -> None:
    from pagedserve.plugins.quant.quantize_cli import quantize

    cli.add_command(quantize)
