"""A small draft model with the target's tokenizer proposes ``k`` tokens, one forward each.

Its KV cache lives in tensors of its own but is addressed by the target's block tables, so the
blocks the scheduler hands a request hold both models' KV, and the scheduler keeps ``k``
lookahead slots past the scheduled tokens for the draft's proposals. After each step the draft
catches up on the request's new tokens (the whole prompt for a request it has not seen, or one
that was preempted) in its first forward, whose last position gives the first proposal; each
further forward adds one. The KV it wrote for the proposals it fed stays valid where the target
accepted them, so after a rejection the catch-up is the target's one token (a decode step),
after a full acceptance the last proposal and that token.

Greedy requests get the draft's argmax; sampled ones a token drawn from the draft's
distribution at the request's temperature, which travels with the proposal for the rejection
rule (``min(1, p/q)``). A request stops drafting after a token the draft gave less than
``draft_confidence_threshold`` (its later proposals would most likely be rejected; the rule
depends only on the draft, so the output stays exact).

The forwards after the first bring one token per request: they run as padded decode steps on
persistent input buffers (``core.cuda_graphs.PaddedDecode``, the target's decode-step
mechanism), so the k steps build no layout of their own. On the CPU every draft forward runs on
one thread: its matrices (a few rows by the draft's hidden size) are far below the size where
intra-op threads pay, and each threaded op waits for every thread of the pool, which on a busy
machine means waiting for a free core (measured in docs/speculative.md). There those decode
steps are compiled by inductor at start-up even when the target runs eagerly (speculative_config
``enforce_eager``, vLLM's key, turns it off): a small draft's step is nearly all per-op overhead,
and compiling it made the draft's steps a third cheaper, where compiling the target as well
speeds up plain decoding as much as speculation.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagedserve.assets import DEFAULT_MODEL, DRAFT_MODEL, bundled_model_path
from pagedserve.core.config import ConfigError, EngineConfig, ModelConfig
from pagedserve.core.compiled_decode import compiled_decode_steps, default_compile_sizes
from pagedserve.core.cuda_graphs import PaddedDecode, capture_sizes
from pagedserve.core.forward_context import build_batch_layout, set_forward_context
from pagedserve.core.layers.attention import Attention
from pagedserve.core.layers.cpu_gemm import prepack_dense_linears
from pagedserve.core.loader import get_model_max_len, load_hf_config, load_model, resolve_model_path
from pagedserve.core.request import Request
from pagedserve.core.sampling import request_generator
from pagedserve.core.speculative import DraftTokens, ProposalBatch, Proposer, disable_by_batch_size

logger = logging.getLogger(__name__)

#: Targets whose draft is known when ``speculative_config`` names none.
DEFAULT_DRAFTS = {DEFAULT_MODEL: DRAFT_MODEL}


@dataclass
class _DraftState:
    """Positions ``0 .. num_computed - 1`` of the request hold valid draft KV, and the next ones
    the KV of the proposals ``fed`` after them (valid while the request was not preempted
    since; a fed proposal's KV is the request's where the request kept it, and every one
    before)."""

    num_computed: int
    num_preemptions: int
    fed: list[int]

    def valid_until(self, token_ids: list[int], limit: int) -> int:
        """How many of the request's first positions (at most ``limit``) hold its KV."""
        valid = min(self.num_computed, limit)
        for position, token in enumerate(self.fed, self.num_computed):
            if position >= limit or token_ids[position] != token:
                break
            valid = position + 1
        return valid


def default_draft(target: str) -> str | None:
    if target in DEFAULT_DRAFTS:
        return DEFAULT_DRAFTS[target]
    for name, draft in DEFAULT_DRAFTS.items():
        folder = bundled_model_path(name)
        if folder is not None and Path(target).expanduser().resolve() == folder.resolve():
            return draft
    return None


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """Torch's intra-op threads set to one on the CPU for the block (restored after)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _draft_dtype(config: EngineConfig, device: torch.device) -> str:
    """The draft's dtype: the target's, except on the CPU, where a draft runs in float32.

    A draft step multiplies a few rows by a small hidden size; there a bfloat16 matmul's fixed
    cost (oneDNN's set-up for the AMX path, tens of microseconds a call) is several times the
    float32 one's, and the norms and activations upcast and downcast around it. float32 weights
    of a draft are a few MB, and its KV cache is its own."""
    return "float32" if device.type == "cpu" else config.model.dtype


def _tokenizer_vocab(folder: str) -> dict[str, int] | None:
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("model", {}).get("vocab")


class DraftModelProposer(Proposer):
    """``speculative_config={"method": "draft_model", "model": PATH, ...}``."""

    needs_lookahead_slots = True
    #: Measured on the CPU with the bundled models (docs/speculative.md): the bundled draft did
    #: not pay even at batch 1 there, so it runs only for a request alone.
    default_disable_by_batch_size = 1

    def __init__(self, config: EngineConfig, runner: Any) -> None:
        super().__init__(config, runner)
        spec = config.speculative
        assert spec is not None
        name = spec.model or default_draft(config.model.model)
        if name is None:
            raise ConfigError(
                f"speculative_config method 'draft_model' needs a 'model' (the draft's folder): "
                f"{config.model.model} has no bundled default draft"
            )
        draft_config = ModelConfig(model=name, dtype=_draft_dtype(config, runner.device), seed=config.model.seed)
        draft_config.model_path = resolve_model_path(name)
        draft_config.hf_config = load_hf_config(draft_config.model_path)
        self._check_compatible(config, draft_config)
        self.device = runner.device
        self.block_size = runner.block_size
        self.backend = runner.backend
        self.vocab_size = runner.vocab_size
        self.model = load_model(draft_config, None, self.device.type)
        self.layers = sorted(
            (m for m in self.model.modules() if isinstance(m, Attention)), key=lambda m: m.layer_index
        )
        self.dtype = next(self.model.parameters()).dtype
        self.generator = torch.Generator(device=self.device).manual_seed(config.model.seed + 1)
        self.confidence_threshold = spec.draft_confidence_threshold
        self._states: dict[str, _DraftState] = {}
        self._decode: PaddedDecode | None = None

    @staticmethod
    def _check_compatible(config: EngineConfig, draft: ModelConfig) -> None:
        target_hf, draft_hf = config.model.hf_config, draft.hf_config
        if int(draft_hf.vocab_size) != int(target_hf.vocab_size):
            raise ConfigError(
                f"the draft model {draft.model} has a vocabulary of {draft_hf.vocab_size} tokens but "
                f"the target {config.model.model} has {target_hf.vocab_size}: a draft must share the "
                "target's tokenizer; choose another draft"
            )
        target_vocab = _tokenizer_vocab(config.model.tokenizer or config.model.model_path or "")
        draft_vocab = _tokenizer_vocab(draft.model_path or "")
        if target_vocab is not None and draft_vocab is not None and target_vocab != draft_vocab:
            raise ConfigError(
                f"the draft model {draft.model} has a different tokenizer from the target "
                f"{config.model.model} (same size, other tokens); choose a draft trained with the "
                "target's tokenizer"
            )
        max_len = config.model.max_model_len or 0
        if get_model_max_len(draft_hf) < max_len:
            raise ConfigError(
                f"the draft model {draft.model} handles {get_model_max_len(draft_hf)} positions, "
                f"fewer than max_model_len={max_len}; lower max_model_len or choose another draft"
            )

    # -- KV cache ------------------------------------------------------------------------------

    def kv_cache_bytes_per_block(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return sum(
            element * int(torch.Size(self.backend.kv_cache_shape(1, self.block_size, l.num_kv_heads, l.head_size)).numel())
            for l in self.layers
        )

    def allocate_kv_cache(self, num_blocks: int) -> None:
        # One block more than the scheduler's: the padding rows of a padded decode step write
        # their K/V there, as the target's do.
        for layer in self.layers:
            shape = self.backend.kv_cache_shape(num_blocks + 1, self.block_size, layer.num_kv_heads, layer.head_size)
            layer.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        config = self.config
        if config.compilation_level == 3 and config.speculative.enforce_eager is not True:  # type: ignore[union-attr]
            # The target's compiled CPU decode step, for the draft too.
            sizes = capture_sizes(config) if config.cuda_graph_sizes else default_compile_sizes(
                config.scheduler.max_num_seqs)
            self._decode = self._compiled_decode(sizes, num_blocks)
            return
        if self._compiles_alone():
            try:
                self._decode = self._compiled_decode(self._draft_sizes(), num_blocks)
                return
            except Exception as exc:  # inductor: no C++ compiler, or an op it cannot compile
                if self.config.speculative.enforce_eager is False:  # type: ignore[union-attr]
                    raise ConfigError(
                        f"compiling the draft's decode step failed ({type(exc).__name__}: {exc}); set "
                        "speculative_config enforce_eager to true to run the draft eagerly"
                    ) from exc
                logger.warning("compiling the draft's decode step failed (%s: %s); the draft runs eagerly",
                               type(exc).__name__, exc)
        if self.device.type == "cpu":  # an eager draft: its dense weights for oneDNN, timed as it runs
            with _one_thread(self.device):
                prepack_dense_linears(self.model)
        self._decode = PaddedDecode(config, capture_sizes(config), self.backend, self.model, num_blocks,
                                    self.device, capture=False)

    def _compiles_alone(self) -> bool:
        """Whether the draft's decode steps are compiled while the target's are not (the CPU
        default; ``speculative_config`` enforce_eager)."""
        enforce_eager = self.config.speculative.enforce_eager  # type: ignore[union-attr]
        if self.device.type != "cpu":
            if enforce_eager is False:
                raise ConfigError(
                    f"speculative_config enforce_eager false compiles the draft's decode step on the CPU; "
                    f"on {self.device.type!r} the draft runs eagerly: drop enforce_eager"
                )
            return False
        return enforce_eager is not True and not self.config.torch_compile

    def _draft_sizes(self) -> list[int]:
        """The padded sizes of the draft's decode steps: the powers of two up to the most
        running sequences it drafts for (``disable_by_batch_size``; 1 by default)."""
        limit = disable_by_batch_size(self.config, type(self))
        max_num_seqs = self.config.scheduler.max_num_seqs
        return default_compile_sizes(min(limit, max_num_seqs) if limit else max_num_seqs)

    def _compiled_decode(self, sizes: list[int], num_blocks: int) -> PaddedDecode:
        """The draft's decode step compiled for ``sizes`` at start-up, on the one thread it runs
        with (inductor's generated kernels and its cache depend on the thread count)."""
        decode = compiled_decode_steps(self.config, self.model, self.backend, sizes, num_blocks, self.device,
                                       exact=True)
        with _one_thread(self.device), torch.inference_mode():
            decode.compile_all()
        return decode

    # -- proposing -----------------------------------------------------------------------------

    def request_finished(self, request: Request) -> None:
        self._states.pop(request.request_id, None)

    def propose(self, batch: ProposalBatch) -> list[DraftTokens]:
        requests = []
        limits = []
        seqs: list[tuple[list[int], int, int]] = []
        token_ids: list[int] = []
        for request, k in zip(batch.requests, batch.max_num_tokens):
            num_tokens = request.num_tokens
            # The catch-up writes up to position num_tokens - 1, proposal j (from 1) is fed at
            # num_tokens + j - 1 for the next: all within the request's blocks (no lookahead
            # slots when blocks ran short: no proposal this time).
            slots = len(request.block_ids) * self.block_size
            if slots < num_tokens:
                continue
            state = self._states.get(request.request_id)
            start = 0
            if state is not None and state.num_preemptions == request.num_preemptions:
                # The proposals the target accepted were fed already: usually only its own
                # token is new, and the catch-up is a padded decode step.
                start = state.valid_until(request.all_token_ids, num_tokens - 1)
            self._states[request.request_id] = _DraftState(num_tokens, request.num_preemptions, [])
            requests.append(request)
            limits.append(min(k, slots - num_tokens + 1))
            seqs.append((request.block_ids, start, num_tokens - start))
            token_ids.extend(request.all_token_ids[start:])
        by_id: dict[str, DraftTokens] = {}
        if requests:
            with _one_thread(self.device):
                drafts = self._propose(requests, limits, seqs, token_ids)
            for request, draft in zip(requests, drafts):
                by_id[request.request_id] = draft
                # Every proposal but the last was fed (its KV written) for the next one.
                self._states[request.request_id].fed = draft.token_ids[:-1]
        return [by_id.get(r.request_id, DraftTokens([])) for r in batch.requests]

    def _propose(
        self,
        requests: list[Request],
        limits: list[int],
        seqs: list[tuple[list[int], int, int]],
        token_ids: list[int],
    ) -> list[DraftTokens]:
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        if all(count == 1 for _, _, count in seqs):
            logits = self._decode_step(token_ids, [start for _, start, _ in seqs], [b for b, _, _ in seqs])
        else:
            logits = self._forward(seqs, token_ids)
        active = [i for i, limit in enumerate(limits) if limit > 0]
        logits = logits[active]
        step = 0
        while active:
            confident = self._choose(logits, active, requests, drafts, probs)
            step += 1
            active = [i for i, sure in zip(active, confident) if sure and limits[i] > step]
            if not active:
                break
            # Each proposal goes in at its position: its KV, then the next proposal's logits.
            logits = self._decode_step(
                [drafts[i][-1] for i in active],
                [requests[i].num_tokens + step - 1 for i in active],
                [requests[i].block_ids for i in active],
            )
        return [DraftTokens(d, torch.stack(p) if p else None) for d, p in zip(drafts, probs)]

    def _forward(self, seqs: list[tuple[list[int], int, int]], token_ids: list[int]) -> torch.Tensor:
        """The draft's logits [len(seqs), V] at each sequence's last new position."""
        layout = build_batch_layout(seqs, self.block_size, self.device)
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        with set_forward_context(self.backend, self.backend.build_metadata(layout)):
            hidden = self.model(input_ids, layout.positions)
        ends = layout.query_start_loc[1:].long() - 1
        return self.model.compute_logits(hidden[ends])

    def _decode_step(self, token_ids: list[int], positions: list[int], block_ids: list[list[int]]) -> torch.Tensor:
        """The draft's logits [len(token_ids), V] after one token per request, as a padded
        decode step (eagerly when the batch is above the largest padded size)."""
        assert self._decode is not None, "allocate_kv_cache runs before the first proposal"
        size = self._decode.padded_size(len(token_ids))
        if size is None:
            return self._forward([(b, p, 1) for b, p in zip(block_ids, positions)], token_ids)
        return self.model.compute_logits(self._decode.run(token_ids, positions, block_ids, size))

    def _choose(
        self,
        logits: torch.Tensor,
        active: list[int],
        requests: list[Request],
        drafts: list[list[int]],
        probs: list[list[torch.Tensor]],
    ) -> list[bool]:
        """Append one proposal to each active request (row i of ``logits`` is ``active[i]``);
        per request, whether the draft gave its proposal at least the confidence threshold."""
        greedy = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        greedy_ids, greedy_probs = greedy.indices.tolist(), greedy.values.tolist()
        confident = []
        for row, index in enumerate(active):
            request = requests[index]
            params = request.sampling_params
            token, prob = greedy_ids[row], greedy_probs[row]
            if not params.greedy:
                q = torch.softmax(logits[row].float() / params.temperature, dim=-1)
                generator = request_generator(request, self.device) if params.seed is not None else self.generator
                token = int(torch.multinomial(q, 1, generator=generator))
                prob = float(q[token])
                probs[index].append(q)
            drafts[index].append(token)
            confident.append(prob >= self.confidence_threshold)
        return confident
