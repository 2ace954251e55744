from pagedserve.plugins.attention.torch_ref.backend import TorchRefBackend


class ToyBackend(TorchRefBackend):
    """The reference attention, counting its calls."""

    name = "toy"
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        return super().forward(*args, **kwargs)
