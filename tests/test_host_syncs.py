"""No host round trip per request in a step: a counting shim (a torch function mode) counts every
call that reads device data on the host (``tolist``, ``item``, ``bool()``/``int()``/``float()``
of a tensor, ``numpy``, ``cpu``, ``nonzero``, boolean-mask indexing: each one a synchronisation on
CUDA) during the runner's step. A decode step makes exactly one, the copy of its sampled tokens
(with their logprobs), whatever the batch size and the sampling parameters; a step whose
requests ask for prompt logprobs makes one more for all of them."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pagedserve import SamplingParams
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine

HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
              "nonzero", "argwhere", "masked_select", "unique"}


class HostReadCounter(TorchFunctionMode):
    """Counts the calls that would copy device data to the host (and so wait for the device)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in HOST_READS:
            self.calls.append(name)
        elif name in ("__getitem__", "__setitem__") and _has_bool_index(args[1]):
            self.calls.append(f"{name}[bool]")
        elif name == "to" and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values())):
            self.calls.append("to(cpu)")
        return func(*args, **kwargs)


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _params(i: int) -> SamplingParams:
    """A different mix of every sampling feature for each request."""
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9, top_k=20, seed=i),
        dict(temperature=1.0, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.3),
        dict(temperature=0.7, logit_bias={5: 2.0, 9: -1.0}, min_tokens=8, logprobs=3),
        dict(temperature=0.0, allowed_token_ids=list(range(3, 200)), bad_words=["the"], logprobs=0),
    ]
    return SamplingParams(max_tokens=12, ignore_eos=True, **kinds[i % len(kinds)])


def _engine(model_dir, **kwargs) -> LLMEngine:
    config = engine_config_from_args(str(model_dir), dtype="float32", max_num_seqs=8, **kwargs)
    return LLMEngine(config)


def _count_steps(engine: LLMEngine) -> list[tuple[int, bool, list[str]]]:
    """Run the engine to the end; per step: (requests, decode-only, the host reads)."""
    runner = engine.runner
    execute = runner.execute
    steps = []

    def counted(scheduler_output):
        counter = HostReadCounter()
        with counter:
            output = execute(scheduler_output)
        decode = all(item.num_new_tokens == 1 for item in scheduler_output.scheduled)
        steps.append((len(scheduler_output.scheduled), decode, counter.calls))
        return output

    runner.execute = counted
    while engine.has_unfinished_requests():
        engine.step()
    return steps


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "padded"])
def test_one_host_read_per_decode_step_at_any_batch_size(tiny_model, padded: bool) -> None:
    engine = _engine(tiny_model(), **({"cuda_graph_sizes": [8]} if padded else {}))
    for i in range(8):
        # Staggered lengths: decode batches of 1 to 8 requests, mixed with prefill steps.
        engine.add_request(f"r{i}", "def f(x):\n    return x" * (1 + i % 3), _params(i))
        engine.step()
    steps = _count_steps(engine)
    decodes = [(n, calls) for n, decode, calls in steps if decode and n]
    assert {n for n, _ in decodes} >= {8}
    for n, calls in decodes:
        assert calls == ["tolist"], f"a decode step of {n} requests read the device {len(calls)} times: {calls}"
    assert all(len(calls) <= 1 for n, _, calls in steps)


def test_prompt_logprobs_add_one_host_read_for_the_whole_step(tiny_model) -> None:
    engine = _engine(tiny_model())
    for i in range(4):
        engine.add_request(f"p{i}", "import os\nimport sys" * (1 + i), SamplingParams(max_tokens=2, prompt_logprobs=2))
    steps = _count_steps(engine)
    assert steps[0][0] == 4 and steps[0][2] == ["tolist", "tolist"]  # the prompt logprobs of all four, then the tokens
