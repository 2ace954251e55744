"""A model's ``config.json`` read without transformers' config classes, for a family whose
config is plain values over defaults.

Importing a transformers 5 config class costs about a second of start-up on a 2-core CPU (its
field validators import ``transformers.activations``, which reaches ``torch.distributed.tensor``).
A family whose config class only fills defaults can instead give the loader a
``config_from_dict`` (see ``LlamaForCausalLM``) built on ``config_from_values``; any config it is
not sure to read as transformers would (another ``model_type``, remote code, an older key layout
transformers rewrites) returns None and goes through ``AutoConfig`` as before.
``tests/test_config_file.py`` checks each family's defaults and the built model against
transformers' own config class.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

#: Keys transformers' config classes rewrite when they find them (the older RoPE layout is
#: turned into ``rope_parameters``; ``auto_map`` names remote code to refuse), so a config that
#: has one is left to ``AutoConfig``.
REWRITTEN_KEYS = ("rope_scaling", "auto_map", "attribute_map")


class ModelConfigFile(SimpleNamespace):
    """``config.json``'s keys as attributes over a family's defaults (what the model classes,
    the loader and the engine read of a config with ``getattr``)."""


def config_from_values(
    values: Mapping[str, Any], model_type: str, defaults: Mapping[str, Any]
) -> ModelConfigFile | None:
    """``values`` over ``defaults`` when ``values`` is a config of ``model_type`` that
    transformers' config class would read as it is; None otherwise."""
    if values.get("model_type") != model_type or any(values.get(key) is not None for key in REWRITTEN_KEYS):
        return None
    return ModelConfigFile(**{**defaults, **values})
