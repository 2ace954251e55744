"""Beam search: vLLM's API (``BeamSearchParams``, ``BeamSearchOutput``) with transformers'
semantics (``generate(num_beams=W, do_sample=False, length_penalty, early_stopping)``).

A request's ``beam_width`` beams are ``beam_width`` sequences that run in the same steps. Each
step every beam offers its top ``K`` next tokens (``K = max(2, 1 + number of EOS ids) * W``, as
transformers keeps); the group scores them (beam score + token logprob, in float32 as
transformers does), moves the best ending ones (EOS, or the length limit) into the finished
hypotheses with their length-penalised score, and continues the best ``W`` others. A beam chosen
by several continuations is forked (its blocks shared copy-on-write, through the KV-cache
manager); a beam chosen by none gives its seat to one of them, its blocks freed at once.

transformers' stopping rules, kept exactly: only continuations ranked in the top ``W`` can
finish; no hypothesis is added once all ``W`` are finished with ``early_stopping=True``, or once
the early-stop heuristic says no running beam can beat the worst finished one (the best running
score over ``generated ** length_penalty``, or over ``max_tokens ** length_penalty`` with
``early_stopping="never"`` and a positive penalty); the search ends then, or at ``max_tokens``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedserve.core.outputs import CompletionOutput, RequestOutput
from pagedserve.core.request import Request, RequestStatus, link_forks
from pagedserve.core.sampling_params import MAX_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from pagedserve.core.sampling import TokenLogprobs
    from pagedserve.core.scheduler import Scheduler
    from pagedserve.core.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

#: transformers' stand-in for "impossible" scores.
_IMPOSSIBLE = np.float32(-1e9)


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters, plus transformers' ``early_stopping`` (True, False or
    ``"never"``). ``temperature`` is accepted as vLLM does; beams are scored by the raw
    logprobs (as in vLLM v1 and transformers' ``do_sample=False``), so it changes nothing."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        for name, value in (("beam_width", self.beam_width), ("max_tokens", self.max_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.beam_width * 2 > MAX_LOGPROBS:
            raise ValueError(f"beam_width must be at most {MAX_LOGPROBS // 2}, got {self.beam_width}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.length_penalty, (int, float)) or not np.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if self.temperature > 0:
            logger.warning("beam search scores beams by raw logprobs: temperature=%s changes nothing", self.temperature)


@dataclass
class BeamSearchSequence:
    """One finished beam, as vLLM reports it: ``tokens`` and ``text`` include the prompt."""

    tokens: list[int]
    logprobs: list[TokenLogprobs]
    cum_logprob: float
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The ``beam_width`` best sequences of one prompt, best (length-penalised score) first."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Hypothesis:
    score: np.float32  # length-penalised
    cum_logprob: float
    token_ids: list[int]  # the output, the EOS that ended it included
    logprobs: list[TokenLogprobs]
    eos: bool


@dataclass
class _Candidate:
    score: np.float32  # the beam's score plus the token's logprob
    beam: int
    token: int
    logprobs: TokenLogprobs


@dataclass
class BeamSearchGroup:
    """One beam search request: its beams (sequences) and its finished hypotheses."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    params: BeamSearchParams
    eos_token_ids: tuple[int, ...]
    max_new_tokens: int
    detokenizer_factory: Any  # (params) -> IncrementalDetokenizer
    scores: list[np.float32] = field(default_factory=list)
    hypotheses: list[_Hypothesis] = field(default_factory=list)
    generated: int = 0
    done: bool = False
    _improvable: bool = True
    _candidates: dict[str, TokenLogprobs] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Only the first beam's continuations count at first: all beams hold the same prompt.
        self.scores = [np.float32(0.0)] + [_IMPOSSIBLE] * (len(self.sequences) - 1)

    @classmethod
    def build(
        cls,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: BeamSearchParams,
        eos_token_ids: tuple[int, ...],
        max_new_tokens: int,
        detokenizer_factory: Any,
        *,
        max_num_seqs: int,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: Any = None,
    ) -> BeamSearchGroup:
        """The group and its ``beam_width`` sequences, the first their fork leader (the one
        to schedule); ValueError when the beams cannot run."""
        width = params.beam_width
        if width > max_num_seqs:
            raise ValueError(
                f"beam_width={width} beams exceed max_num_seqs={max_num_seqs}; lower it or raise max_num_seqs"
            )
        seq_params = cls.sequence_params(params, eos_token_ids, max_new_tokens)
        beams = [
            Request(
                f"{request_id}#{i}", prompt_token_ids, seq_params, arrival_time=arrival_time,
                priority=priority, cache_salt=cache_salt, parent_id=request_id, index=i,
            )
            for i in range(width)
        ]
        for beam in beams:
            beam.group_chooses_tokens = True
        link_forks(beams)
        return cls(
            request_id, prompt, prompt_token_ids, beams, params, eos_token_ids, max_new_tokens,
            detokenizer_factory,
        )

    @staticmethod
    def num_candidates(params: BeamSearchParams, eos_token_ids: tuple[int, ...]) -> int:
        num_eos = 0 if params.ignore_eos else len(eos_token_ids)
        return max(2, 1 + num_eos) * params.beam_width

    @staticmethod
    def sequence_params(params: BeamSearchParams, eos_token_ids: tuple[int, ...], max_new: int) -> SamplingParams:
        """What each beam runs with: the group stops it, and reads its top-K logprobs."""
        k = BeamSearchGroup.num_candidates(params, eos_token_ids)
        if k > MAX_LOGPROBS:
            raise ValueError(
                f"beam_width={params.beam_width} with {len(eos_token_ids)} EOS ids needs {k} candidates "
                f"per beam, more than {MAX_LOGPROBS}; lower beam_width or set ignore_eos"
            )
        return SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True, logprobs=k, detokenize=False)

    @property
    def finished(self) -> bool:
        return self.done

    def record(self, seq: Request, logprobs: TokenLogprobs | None) -> None:
        """A beam's logprobs for its next token (kept until every beam has them)."""
        if logprobs is None:
            raise RuntimeError(f"beam {seq.request_id} sampled without logprobs")
        self._candidates[seq.request_id] = logprobs

    def ready(self) -> bool:
        return not self.done and all(s.request_id in self._candidates for s in self.sequences)

    # -- one beam search step ------------------------------------------------------------------

    def advance(self, scheduler: Scheduler) -> None:
        """Every beam has its next-token logprobs: choose the next beams (and finished ones)."""
        width = len(self.sequences)
        candidates = []
        for beam, seq in enumerate(self.sequences):
            entry = self._candidates[seq.request_id]
            for token, logprob in entry.items():
                candidates.append(_Candidate(self.scores[beam] + np.float32(logprob.logprob), beam, token, entry))
        self._candidates.clear()
        candidates.sort(key=lambda c: (-c.score, c.beam, c.token))
        top = candidates[: self.num_candidates(self.params, self.eos_token_ids)]
        last = self.generated + 1 >= self.max_new_tokens
        ends = [last or (c.token in self.eos_token_ids and not self.params.ignore_eos) for c in top]

        self._add_hypotheses([c for c, end in zip(top[:width], ends) if end])
        self.generated += 1
        running = [c for c, end in zip(top, ends) if not end][:width]
        if not last:
            if len(running) < width:
                raise RuntimeError(f"{self.request_id}: fewer than {width} continuations (a vocabulary that small?)")
            self._continue(scheduler, running)
        self._check_improvable()
        full = len(self.hypotheses) == width and self.params.early_stopping is True
        if last or full or not self._improvable:
            self.done = True
            for seq in self.sequences:
                scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_STOPPED)

    def _penalised(self, score: np.float32, length: int) -> np.float32:
        return np.float32(score / np.float32(length**self.params.length_penalty))

    def _add_hypotheses(self, ended: list[_Candidate]) -> None:
        width = len(self.sequences)
        if not ended or not self._improvable or (len(self.hypotheses) == width and self.params.early_stopping is True):
            return
        for c in ended:
            parent = self.sequences[c.beam]
            self.hypotheses.append(
                _Hypothesis(
                    score=self._penalised(c.score, self.generated + 1),
                    cum_logprob=float(c.score),
                    token_ids=[*parent.output_token_ids, c.token],
                    logprobs=[*parent.logprobs, c.logprobs],
                    eos=c.token in self.eos_token_ids and not self.params.ignore_eos,
                )
            )
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[width:]

    def _continue(self, scheduler: Scheduler, running: list[_Candidate]) -> None:
        """Give the chosen continuations the beams' seats: a beam continued once keeps its
        seat, one continued k times forks into k - 1 seats of beams continued by none."""
        by_parent: dict[int, list[_Candidate]] = defaultdict(list)
        for c in running:
            by_parent[c.beam].append(c)
        free_seats = [b for b in range(len(self.sequences)) if b not in by_parent]
        seats: dict[int, _Candidate] = {}
        for beam, children in by_parent.items():
            seats[beam] = children[0]
            for child in children[1:]:
                seats[free_seats.pop()] = child
        for seat, c in seats.items():  # forks first: they copy the parents before they grow
            if seat != c.beam:
                parent, target = self.sequences[c.beam], self.sequences[seat]
                scheduler.fork_into(parent, target)
                target.output_token_ids = list(parent.output_token_ids)
                target.all_token_ids = list(parent.all_token_ids)
                target.logprobs = list(parent.logprobs)
        for seat, c in seats.items():
            seq = self.sequences[seat]
            seq.append_output_token(c.token)
            seq.logprobs.append(c.logprobs)
            seq.cumulative_logprob = float(c.score)
            self.scores[seat] = c.score

    def _check_improvable(self) -> None:
        """transformers' early-stop heuristic (sticky once false)."""
        if len(self.hypotheses) < len(self.sequences) or not self._improvable:
            return
        penalty = self.params.length_penalty
        length = self.max_new_tokens if self.params.early_stopping == "never" and penalty > 0 else self.generated
        best_running = self._penalised(max(self.scores), length)
        self._improvable = bool(best_running > min(h.score for h in self.hypotheses))

    # -- outputs -------------------------------------------------------------------------------

    def make_output(self, *, force: bool = False) -> RequestOutput | None:
        """The finished beams, best first; None while searching (an abort reports the beams
        so far, unfinished)."""
        if not self.done and not force:
            return None
        completions = [self._completion(i, h) for i, h in enumerate(self.hypotheses)]
        if not self.done:
            completions = [
                CompletionOutput(index=i, text="", token_ids=list(s.output_token_ids), finish_reason="abort")
                for i, s in enumerate(self.sequences)
            ]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=True,
        )

    def _completion(self, index: int, hypothesis: _Hypothesis) -> CompletionOutput:
        """vLLM's rule: the EOS that ended a beam is not in its output unless
        ``include_stop_str_in_output``."""
        token_ids, logprobs = hypothesis.token_ids, hypothesis.logprobs
        if hypothesis.eos and not self.params.include_stop_str_in_output:
            token_ids, logprobs = token_ids[:-1], logprobs[:-1]
        detokenizer: IncrementalDetokenizer = self.detokenizer_factory()
        detokenizer.update(token_ids)
        detokenizer.flush()
        text = detokenizer.text
        return CompletionOutput(
            index=index,
            text=text,
            delta_text=text,
            token_ids=token_ids,
            cumulative_logprob=hypothesis.cum_logprob,
            logprobs=logprobs,
            finish_reason="stop" if hypothesis.eos else "length",
        )
