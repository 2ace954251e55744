"""The xgrammar grammar backend: a logits processor that masks every token a request's grammar
does not allow.

* ``prepare_request`` (when a request is added) builds the grammar, which checks it (ValueError),
  and hands the compile to a worker thread; the request waits for that future in the scheduler
  (vLLM's WAITING_FOR_FSM) while the others run. Compiled grammars are cached by their text.
* ``apply`` (each step) touches only the constrained rows: each gets a matcher on first use, kept
  for its ``Request`` object (so the ``n`` sequences of a request have one each), advanced by the
  tokens the request accepted since, which survives preemption (recompute keeps the output
  tokens, and the matcher with them). Then the rows' bitmasks are filled and applied at once.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from pagedserve.core.rejection_sampler import DraftPosition
from pagedserve.core.request import Request
from pagedserve.core.sampling import LogitsProcessor, SamplingBatch

#: xgrammar and the grammar builders on it, imported at the first constrained request (importing
#: xgrammar is 0.1-0.2 s that every engine start-up would pay): ``_import_xgrammar``.
xgr: Any = None
build_grammar: Any = None
grammar_key: Any = None


def _import_xgrammar() -> bool:
    """Import xgrammar once; False when it is not installed (a constrained request is refused)."""
    global xgr, build_grammar, grammar_key
    if xgr is None:
        try:
            import xgrammar

            from pagedserve.plugins.structured import grammars
        except ImportError:
            return False
        xgr, build_grammar, grammar_key = xgrammar, grammars.build_grammar, grammars.grammar_key
    return True

logger = logging.getLogger(__name__)

#: Compiled grammars kept (least recently used dropped first).
CACHE_SIZE = 512
COMPILE_THREADS = 1
#: Compact JSON has no raw control character anywhere (strings must escape them), but
#: xgrammar 0.2.9's strings with a ``maxLength`` accept them: these rows also mask such tokens.
JSON_KINDS = ("json", "json_object")


@dataclass
class _RowState:
    """A sequence's matcher, how many of its output tokens it has accepted, and the proposed
    (speculative) tokens it holds beyond them during one step's verification."""

    matcher: Any
    accepted: int = 0
    broken: bool = False
    speculated: list[int] = field(default_factory=list)


class StructuredOutputsProcessor(LogitsProcessor):
    """Masks the rows whose ``SamplingParams.structured_outputs`` is set; others cost nothing."""

    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        super().__init__(vocab_size, device)
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._stop_ids: list[int] = []
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self._rows: weakref.WeakKeyDictionary[Request, _RowState] = weakref.WeakKeyDictionary()
        self._bitmask: torch.Tensor | None = None
        self._no_control_bytes: torch.Tensor | None = None

    # -- when a request is added ------------------------------------------------------------------

    def prepare_request(self, request: Request, tokenizer: Any) -> Future | None:
        params = request.sampling_params.structured_outputs
        if params is None:
            return None
        if not _import_xgrammar():
            raise ValueError(
                "structured_outputs needs the xgrammar package: pip install 'pagedserve[structured]'"
            )
        key = grammar_key(params)
        with self._lock:
            future = self._compiled.get(key)
            if future is not None:
                self._compiled.move_to_end(key)
                return future
        grammar = build_grammar(*key)  # the check: ValueError before anything is queued
        compiler = self._compiler_for(tokenizer, request.sampling_params.eos_token_ids)
        with self._lock:
            future = self._compiled.get(key)
            if future is None:
                future = self._pool().submit(compiler.compile_grammar, grammar)
                self._compiled[key] = future
                while len(self._compiled) > CACHE_SIZE:
                    self._compiled.popitem(last=False)
        return future

    def _compiler_for(self, tokenizer: Any, eos_token_ids: tuple[int, ...]) -> Any:
        """xgrammar's compiler for the engine's tokenizer, built on first use (the engine has
        one tokenizer, and the model's EOS ids end every grammar)."""
        with self._lock:
            if self._compiler is None:
                self._stop_ids = list(eos_token_ids)
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_ids or None
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS)
                self._no_control_bytes = _mask_without_control_bytes(info.decoded_vocab, self.vocab_size)
            return self._compiler

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="pagedserve-grammar")
        return self._executor

    # -- every step -------------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows = [i for i, p in enumerate(batch.params) if p.structured_outputs is not None]
        if not rows:
            return logits
        if self._bitmask is None or self._bitmask.shape[0] < len(batch):
            self._bitmask = xgr.allocate_token_bitmask(len(batch), self.vocab_size)
        bitmask = self._bitmask
        speculating: list[_RowState] = []
        for row in rows:
            view = batch.requests[row]
            # Speculative verification: a row is the request extended by some proposals.
            request = view._request if isinstance(view, DraftPosition) else view
            state = self._state(request)
            proposals = view.output_token_ids[len(request.output_token_ids) :]
            if proposals or state.speculated:
                speculating.append(state)
            if state.broken or not self._speculate(state, proposals) or state.matcher.is_terminated():
                self._only_stop_tokens(bitmask, row)
            else:
                state.matcher.fill_next_token_bitmask(bitmask, row)
        for state in speculating:  # back to the accepted tokens; the next step advances them
            if state.speculated:
                state.matcher.rollback(len(state.speculated))
                state.speculated = []
        json_rows = [row for row in rows if batch.params[row].structured_outputs.kind in JSON_KINDS]
        if json_rows:
            bitmask[json_rows] &= self._no_control_bytes
        mask = bitmask if logits.device.type == "cpu" else bitmask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows)
        return logits

    def _state(self, request: Request) -> _RowState:
        """The sequence's matcher, created on its first sample, advanced to its output."""
        state = self._rows.get(request)
        if state is None:
            compiled = self._compiled_grammar(request)
            if compiled is None:
                state = _RowState(matcher=None, broken=True)
            else:
                state = _RowState(xgr.GrammarMatcher(compiled))
            self._rows[request] = state
        tokens = request.output_token_ids
        while state.accepted < len(tokens) and not state.broken:
            token = tokens[state.accepted]
            state.accepted += 1
            if state.matcher.is_terminated():
                continue  # tokens after the grammar ended (ignore_eos): only stop tokens anyway
            if not state.matcher.accept_token(token):
                logger.error(
                    "request %s: token %d is outside its grammar; only stop tokens from now on",
                    request.request_id, token,
                )
                state.broken = True
        return state

    @staticmethod
    def _speculate(state: _RowState, proposals: list[int]) -> bool:
        """Bring the matcher to the accepted tokens plus ``proposals``; False when the grammar
        rejects one (the row's mask then does not matter: verification stops at that proposal,
        whose own row masked it)."""
        held = state.speculated
        if held != proposals[: len(held)]:
            state.matcher.rollback(len(held))
            state.speculated = held = []
        for token in proposals[len(held) :]:
            if state.matcher.is_terminated() or not state.matcher.accept_token(token):
                return False
            held.append(token)
        return True

    def _compiled_grammar(self, request: Request) -> Any:
        params = request.sampling_params.structured_outputs
        key = grammar_key(params)
        with self._lock:
            future = self._compiled.get(key)
        if future is None:  # dropped from the cache meanwhile: compile here, once
            future = Future()
            future.set_result(self._compiler.compile_grammar(build_grammar(*key)))
            with self._lock:
                self._compiled[key] = future
        try:
            return future.result()
        except Exception:
            logger.exception("request %s: its grammar failed to compile", request.request_id)
            return None

    def _only_stop_tokens(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        for token in self._stop_ids:
            word, bit = divmod(token, 32)
            # int32 words: bit 31 is the sign bit.
            bitmask[row, word] |= torch.tensor(1 << bit, dtype=torch.int64).to(torch.int32)


def _mask_without_control_bytes(decoded_vocab: list[bytes], vocab_size: int) -> torch.Tensor:
    """[ceil(V / 32)] int32 bitmask of the tokens whose text has no byte below 0x20."""
    allowed = torch.ones(-(-vocab_size // 32) * 32, dtype=torch.bool)
    for token, text in enumerate(decoded_vocab[:vocab_size]):
        if any(byte < 0x20 for byte in text):
            allowed[token] = False
    weights = torch.tensor([1 << bit for bit in range(32)], dtype=torch.int64)
    words = (allowed.view(-1, 32).to(torch.int64) * weights).sum(dim=1)
    return words.to(torch.int32)  # wraps bit 31 to the sign bit, as xgrammar's words have it
