"""Built-in plugin: multi-LoRA serving (PEFT adapters; batched shrink/expand in torch and Triton).

``register_lora_formats`` names the adapter formats (loaders of adapter folders); when an engine
starts with ``enable_lora``, ``engine_started`` installs the adapter manager on its model runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.core.hookspecs import Register, hookimpl

if TYPE_CHECKING:
    from pagedserve.core.engine import LLMEngine


@hookimpl
def register_lora_formats(register: Register) -> None:
    register("peft", "pagedserve.plugins.lora.peft_format:PEFTFormat", priority=0)


@hookimpl
def engine_started(engine: LLMEngine) -> None:
    if not engine.config.lora.enable_lora or engine.lora_manager is not None:
        return
    from pagedserve.plugins.lora.manager import LoRAModelManager

    runner = engine.runner
    engine.runner.lora_manager = LoRAModelManager(
        runner.model, engine.config.lora, runner.device, engine.plugins.registry("lora_formats")
    )
