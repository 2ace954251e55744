"""The sampling interfaces: the batch a sampler sees, what it returns, and logprob helpers.

A step's logits arrive as one float32 row per request. The sampler (a plugin; ``default`` is
built in) computes logprobs from the raw logits when asked, runs the registered logits
processors in their ``order``, then picks one token per row. Everything per-row that the
processors and the sampler need is derived once per step from the requests, lazily, by
``SamplingBatch``.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from pagedserve.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.core.plugins import PluginManager
    from pagedserve.core.request import Request


@dataclass
class Logprob:
    """One token's log-probability and its rank (1 = the most likely), as vLLM reports it."""

    logprob: float
    rank: int
    decoded_token: str | None = None


#: Token id -> its Logprob, for one position.
TokenLogprobs = dict[int, Logprob]


def host_to_device(values: Any, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of host values on ``device``. On CUDA it is copied from pinned memory without
    waiting: a plain copy from pageable memory would block the host until the device finished
    its queued work (the step's forward), once per tensor."""
    if torch.device(device).type != "cuda":
        return torch.as_tensor(values, dtype=dtype, device=device)
    return torch.as_tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


def device_to_host(*tensors: torch.Tensor) -> list[list[float]]:
    """Several small tensors in one device-to-host copy (one synchronisation): flattened into
    float64, which holds token ids, ranks and float32 values exactly, then split back into a
    flat list per tensor."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).tolist()
    result, start = [], 0
    for tensor in tensors:
        result.append(flat[start : start + tensor.numel()])
        start += tensor.numel()
    return result


#: The width of the slices ``argmax`` reduces with ``amax`` first, and the fewest logits it does
#: that for: below about 64k (16 rows of 4,096) torch's own argmax was as fast or faster.
ARGMAX_SLICE = 64
ARGMAX_MIN_ELEMENTS = 1 << 16


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` of a [rows, vocab] tensor: the first index of each row's largest
    value (a NaN counting as the largest, as torch's argmax counts it).

    On the CPU torch's argmax along a row is a scalar loop: 207 µs for 64 rows of 4,096 float32
    logits on 2 cores, against 12 µs for their ``amax``; 7.9 ms for 64 rows of a 151,936-token
    vocabulary, against 1.6 ms this way. So each row's slices of ``ARGMAX_SLICE`` values are
    reduced with ``amax``, the first slice holding the row's largest is the argmax of those maxima, and the
    index within it the argmax of that slice alone."""
    width = logits.shape[-1]
    if logits.device.type != "cpu" or logits.numel() < ARGMAX_MIN_ELEMENTS or width < 2 * ARGMAX_SLICE:
        return logits.argmax(dim=-1)
    full = width - width % ARGMAX_SLICE
    maxima = logits[:, :full].unflatten(1, (-1, ARGMAX_SLICE)).amax(-1)
    if full < width:
        maxima = torch.cat((maxima, logits[:, full:].amax(-1, keepdim=True)), dim=1)
    start = maxima.argmax(dim=-1) * ARGMAX_SLICE
    # The last slice may be short: its missing columns repeat the row's last one, after it.
    columns = (start[:, None] + torch.arange(ARGMAX_SLICE, device=logits.device)).clamp_max_(width - 1)
    return start + logits.gather(1, columns).argmax(dim=-1)


def _row_tensor(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return host_to_device(values, dtype, device)


def _padded(rows: list[list[int]], pad: int, device: torch.device | str) -> torch.Tensor:
    """A [len(rows), longest] int64 tensor, short rows filled with ``pad``."""
    width = max((len(r) for r in rows), default=0)
    return _row_tensor([r + [pad] * (width - len(r)) for r in rows], torch.int64, device)


@dataclass
class SamplingBatch:
    """The requests of one sampling step, one logits row each, in the same order.

    The per-row tensors are computed on first use and cached for the step, so a processor that
    is inactive this step costs nothing.
    """

    requests: list[Request]
    device: torch.device | str = "cpu"
    params: list[SamplingParams] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.params = [r.sampling_params for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)

    # -- rows by kind ---------------------------------------------------------------------------

    @cached_property
    def greedy(self) -> torch.Tensor:
        """[R] bool: rows decoded greedily (argmax of the processed logits)."""
        return _row_tensor([p.greedy for p in self.params], torch.bool, self.device)

    @cached_property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)

    @cached_property
    def seeded_rows(self) -> list[int]:
        """Non-greedy rows with their own seed: their noise comes from the request's generator."""
        return [i for i, p in enumerate(self.params) if p.seed is not None and not p.greedy]

    @cached_property
    def max_num_logprobs(self) -> int | None:
        """The largest ``logprobs`` asked for in the batch, or None when no row asks."""
        asked = [p.logprobs for p in self.params if p.logprobs is not None]
        return max(asked) if asked else None

    # -- sampling parameters as tensors ---------------------------------------------------------

    @cached_property
    def temperatures(self) -> torch.Tensor:
        """[R, 1] float32; greedy rows hold 1.0 so that dividing by it is harmless."""
        values = [1.0 if p.greedy else float(p.temperature) for p in self.params]
        return _row_tensor(values, torch.float32, self.device).unsqueeze(1)

    @cached_property
    def top_k(self) -> torch.Tensor | None:
        """[R] int64 (0 = no limit), or None when no row limits k."""
        if all(p.top_k == 0 for p in self.params):
            return None
        # A top_k past any vocabulary (up to 2**63 from a client) means no limit: clamp it.
        return _row_tensor([min(p.top_k, 1 << 31) for p in self.params], torch.int64, self.device)

    @cached_property
    def top_p(self) -> torch.Tensor | None:
        """[R] float32, or None when every row keeps the whole distribution."""
        if all(p.top_p >= 1.0 for p in self.params):
            return None
        return _row_tensor([float(p.top_p) for p in self.params], torch.float32, self.device)

    @cached_property
    def min_p(self) -> torch.Tensor | None:
        """[R] float32, or None when no row uses min-p."""
        if all(p.min_p == 0.0 for p in self.params):
            return None
        return _row_tensor([float(p.min_p) for p in self.params], torch.float32, self.device)

    # -- token history --------------------------------------------------------------------------

    def output_token_ids(self, rows: list[int], pad: int) -> torch.Tensor:
        """[len(rows), longest output] int64 of the rows' output tokens, padded with ``pad``."""
        return _padded([self.requests[i].output_token_ids for i in rows], pad, self.device)

    def prompt_token_ids(self, rows: list[int], pad: int) -> torch.Tensor:
        """[len(rows), longest prompt] int64 of the rows' prompt tokens, padded with ``pad``."""
        return _padded([self.requests[i].prompt_token_ids for i in rows], pad, self.device)


@dataclass
class SamplerOutput:
    """One sampled token per row, and per row its logprob dict when the request asked for one."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class LogitsProcessor(ABC):
    """A batch-level logits transformation (vLLM v1 style).

    ``apply`` reads each row's ``SamplingParams`` (``extra_args`` for third-party options),
    changes only the rows that use it, and returns the logits (changing them in place is
    allowed and expected).
    """

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = device

    def prepare_request(self, request: Request, tokenizer: Any) -> Future | None:
        """Called when a request is added, in the caller's thread: raise ValueError for options
        this processor cannot serve, and start any slow preparation (a grammar to compile) off
        the engine loop. The request is not scheduled before the returned future is done."""
        return None

    @abstractmethod
    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor: ...


class Sampler(ABC):
    """Picks one token per logits row; the logits are modified in place."""

    def __init__(
        self,
        vocab_size: int,
        device: torch.device | str,
        processors: list[LogitsProcessor],
        seed: int,
    ) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.processors = list(processors)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @abstractmethod
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput: ...

    def prepare_request(self, request: Request, tokenizer: Any) -> list[Future]:
        """Every processor's ``prepare_request``: the futures the request waits for."""
        futures = (p.prepare_request(request, tokenizer) for p in self.processors)
        return [future for future in futures if future is not None]

    def distributions(
        self, logits: torch.Tensor, batch: SamplingBatch
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What speculative verification needs instead of a token: per row, the token greedy
        decoding would pick [R] and the distribution sampling would draw from [R, V] (None when
        every row is greedy), after every logits processor. The logits may be modified."""
        raise NotImplementedError(
            f"sampler {type(self).__name__} cannot verify speculative tokens: it does not "
            "implement distributions(); use the default sampler or turn speculation off"
        )


def request_generator(request: Request, device: torch.device | str) -> torch.Generator:
    """The request's own generator, seeded from (seed, index) on first use and kept on it, so
    its tokens depend neither on its batch mates nor on the batch order."""
    generator = getattr(request, "generator", None)
    if generator is None:
        key = f"{request.sampling_params.seed}:{request.index}".encode()
        seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        request.generator = generator
    return generator


@dataclass
class LogprobTensors:
    """The logprobs of N rows on the device, before their one copy to the host: the chosen
    token's logprob and rank [N], and the top ``k`` tokens' ids, logprobs and ranks [N, k]."""

    chosen: torch.Tensor
    chosen_ranks: torch.Tensor
    top_ids: torch.Tensor
    top_values: torch.Tensor
    top_ranks: torch.Tensor
    num_logprobs: list[int]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.chosen, self.chosen_ranks, self.top_ids, self.top_values, self.top_ranks)

    def entries(self, token_ids: list[int], host: list[list[float]]) -> list[TokenLogprobs]:
        """Per row: the chosen token plus its top ``num_logprobs[i]``, from ``host`` (the five
        tensors as ``device_to_host`` returned them)."""
        chosen, chosen_ranks, top_ids, top_values, top_ranks = host
        k = self.top_ids.shape[1]
        result: list[TokenLogprobs] = []
        for row, (token, wanted) in enumerate(zip(token_ids, self.num_logprobs)):
            entry = {token: Logprob(chosen[row], int(chosen_ranks[row]))}
            for j in range(row * k, row * k + min(wanted, k)):
                entry.setdefault(int(top_ids[j]), Logprob(top_values[j], int(top_ranks[j])))
            result.append(entry)
        return result


def logprob_tensors(logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int]) -> LogprobTensors:
    """The device half of ``token_logprobs``. Rank is 1 + the number of tokens with a strictly
    larger logprob."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    chosen_ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    k = min(max(num_logprobs, default=0), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=1)
    # Every token larger than a top-k token is in the top k too: its rank needs only the k.
    top_ranks = (top_values.unsqueeze(1) > top_values.unsqueeze(2)).sum(dim=2) + 1
    return LogprobTensors(chosen, chosen_ranks, top_ids, top_values, top_ranks, list(num_logprobs))


def token_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int]
) -> list[TokenLogprobs]:
    """Per row of ``logprobs`` [N, V]: the chosen token (logprob and rank) plus the top
    ``num_logprobs[i]`` tokens, in one device-to-host copy."""
    tensors = logprob_tensors(logprobs, token_ids, num_logprobs)
    ids, *host = device_to_host(token_ids, *tensors.tensors())
    return tensors.entries([int(t) for t in ids], host)


def compute_prompt_logprobs(
    logits: torch.Tensor, target_token_ids: torch.Tensor, num_logprobs: int | list[int]
) -> list[TokenLogprobs]:
    """Prompt logprobs: row i of ``logits`` [N, V] predicts ``target_token_ids[i]`` (on the
    logits' device). Each dict holds the target token (with its rank) plus the top
    ``num_logprobs`` (per row, or one number for all) tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    wanted = num_logprobs if isinstance(num_logprobs, list) else [num_logprobs] * len(logits)
    return token_logprobs(logprobs, target_token_ids, wanted)


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """Reject token ids the model does not have (``logit_bias`` keys, ``stop_token_ids``,
    ``allowed_token_ids``).

    The engine calls this when a request is added: an out-of-range id inside a step would
    otherwise fail the whole batch."""
    for token in params.logit_bias or {}:
        if not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias has token id {token}, outside the vocabulary [0, {vocab_size})")
    for token in params.stop_token_ids or []:
        if token >= vocab_size:
            raise ValueError(f"stop_token_ids has {token}, outside the vocabulary [0, {vocab_size})")
    for token in params.allowed_token_ids or []:
        if token >= vocab_size:
            raise ValueError(f"allowed_token_ids has {token}, outside the vocabulary [0, {vocab_size})")


def build_sampler(
    name: str,
    vocab_size: int,
    device: torch.device | str,
    seed: int,
    manager: PluginManager | None = None,
    extra_processors: list[str] | None = None,
) -> Sampler:
    """The sampler registered as ``name``, with every registered logits processor in ascending
    ``order`` (ties by name), then the ``extra_processors`` named by class (``"module:Class"`` or
    ``"module.Class"``, vLLM's ``logits_processors``) in the order given."""
    from pagedserve.core.plugins import Entry, PluginError, get_plugin_manager

    manager = manager or get_plugin_manager()
    entries = sorted(
        manager.registry("logits_processors").entries(),
        key=lambda e: (e.metadata.get("order", 0), e.name),
    )
    classes = [entry.load() for entry in entries]
    for qualified in extra_processors or []:
        target = qualified if ":" in qualified else ":".join(qualified.rsplit(".", 1))
        try:
            cls = Entry(qualified, target, plugin="logits_processors").load()
        except PluginError as exc:
            raise PluginError(f"logits_processors: cannot load {qualified!r}: {exc.__cause__}") from exc
        if not (isinstance(cls, type) and issubclass(cls, LogitsProcessor)):
            raise PluginError(f"logits_processors: {qualified!r} is not a LogitsProcessor subclass")
        classes.append(cls)
    processors = [cls(vocab_size, device) for cls in classes]
    sampler_cls = manager.registry("samplers").load(name)
    return sampler_cls(vocab_size, device, processors, seed)
