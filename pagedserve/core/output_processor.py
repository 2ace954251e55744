"""After the scheduler recorded a step: each updated sequence's new tokens detokenized, their
logprobs noted and stop strings applied, its timings taken; then the outputs of the user
requests that changed, in each one's ``output_kind``, and the finished ones let go.

Part of ``LLMEngine.step``; the engine owns the request groups, this fills them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedserve.core.beam_search import BeamSearchGroup
from pagedserve.core.outputs import RequestOutput
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.request_group import RequestGroup

if TYPE_CHECKING:
    from pagedserve.core.model_runner import ModelRunnerBase, RunnerOutput
    from pagedserve.core.plugins import PluginManager
    from pagedserve.core.scheduler import Scheduler


@dataclass
class StepTally:
    """What the sequences of one step brought: the user requests they belong to (in order),
    and the token counts and latencies the step's stats report."""

    touched: dict[str, None] = field(default_factory=dict)
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    time_to_first_tokens: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)


class OutputProcessor:
    """Turns a step's updated sequences into the requests' outputs (``record``, then
    ``make_outputs``)."""

    def __init__(
        self,
        groups: dict[str, RequestGroup | BeamSearchGroup],
        scheduler: Scheduler,
        runner: ModelRunnerBase,
        plugins: PluginManager,
    ) -> None:
        self.groups = groups
        self.scheduler = scheduler
        self.runner = runner
        self.plugins = plugins

    def record(self, updated: list[Request], runner_output: RunnerOutput, now: float) -> StepTally:
        """Note each updated sequence's new tokens (all of a step's arrive at ``now``)."""
        tally = StepTally()
        touched = tally.touched
        groups = self.groups
        logprobs_by_id = runner_output.logprobs
        for seq in updated:
            if seq.pooling_params is not None:  # an embedding, done: no token, no timing
                tally.num_prompt_tokens += seq.num_prompt_tokens
                touched[seq.parent_id] = None
                self.runner.request_finished(seq)
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
                tally.time_to_first_tokens.append(now - seq.arrival_time)
                if seq.index == 0:  # the request's first token: its prompt, counted once
                    tally.num_prompt_tokens += seq.num_prompt_tokens
            else:
                tally.inter_token_latencies.append(now - seq.last_token_time)  # type: ignore[operator]
            seq.last_token_time = now
            group = groups.get(seq.parent_id)
            if group is None:
                continue
            touched[seq.parent_id] = None
            logprobs = logprobs_by_id.get(seq.request_id) if logprobs_by_id else None
            if isinstance(group, BeamSearchGroup):
                group.record(seq, logprobs)
                tally.num_generation_tokens += 1
                continue
            tally.num_generation_tokens += self._record_tokens(group, seq, logprobs)
            if seq.is_finished:
                self.runner.request_finished(seq)
        return tally

    def make_outputs(self, touched: dict[str, None]) -> list[RequestOutput]:
        """The outputs the touched requests report now; finished requests leave the engine
        (``request_finished`` hooks)."""
        outputs = []
        groups = self.groups
        for request_id in touched:
            group = groups[request_id]
            if isinstance(group, BeamSearchGroup) and group.ready():
                group.advance(self.scheduler)
                if group.finished:
                    for seq in group.sequences:
                        self.runner.request_finished(seq)
            output = group.make_output()
            if output is not None:
                outputs.append(output)
            if group.finished:
                del groups[request_id]
                self.plugins.hook.request_finished(output=output)
        return outputs

    def _record_tokens(self, group: RequestGroup, seq: Request, logprobs: Any) -> int:
        """Detokenize the sequence's new tokens (several after accepted speculative tokens),
        note their logprobs, and apply stop strings: a stop string inside the step's tokens
        drops the tokens after it, as if they had never been generated. Returns the number of
        new tokens kept."""
        detokenizer = group.detokenizers[seq.index]
        if logprobs is not None:
            entries = logprobs if isinstance(logprobs, list) else [logprobs]
            start = len(seq.logprobs)
            for token, entry in zip(seq.output_token_ids[start:], entries[: seq.num_output_tokens - start]):
                seq.cumulative_logprob += entry[token].logprob
                if group.params.detokenize:
                    for token_id, logprob in entry.items():
                        logprob.decoded_token = detokenizer.decode_token(token_id)
                seq.logprobs.append(entry)
        num_before = len(detokenizer.output_token_ids)
        new_tokens = seq.output_token_ids[num_before:]
        if detokenizer.finished or not new_tokens:
            return len(new_tokens)
        # EOS or a stop token id ended it: that token's text is not part of the output.
        stop_terminated = seq.status == RequestStatus.FINISHED_STOPPED and not isinstance(seq.stop_reason, str)
        stop = None
        for i, token in enumerate(new_tokens):
            last = i == len(new_tokens) - 1
            stop = detokenizer.update([token], stop_terminated=stop_terminated and last)
            if stop is not None:
                break
        if stop is not None:
            seq.truncate_output(len(detokenizer.output_token_ids))
            if seq.is_finished:
                seq.status, seq.stop_reason = RequestStatus.FINISHED_STOPPED, stop
            else:
                self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=stop)
        return len(detokenizer.output_token_ids) - num_before
