"""Activation functions by the name a HF config gives them (``hidden_act``).

The common names are torch's own modules, computing what transformers' ``ACT2FN`` computes for
them; any other name is looked up in ``ACT2FN``, imported only then. Importing
``transformers.activations`` reaches ``torch.distributed.tensor`` (about 0.7 s on a 2-core CPU),
which would be most of what stands between ``pagedserve generate`` and its first token.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

#: Names computed by torch directly, each the same function as ``ACT2FN[name]``.
TORCH_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


def get_act_fn(name: str) -> nn.Module:
    """The activation module called ``name`` in HF configs; KeyError for a name no one knows."""
    make = TORCH_ACTIVATIONS.get(name)
    if make is not None:
        return make()
    from transformers.activations import ACT2FN

    return ACT2FN[name]
