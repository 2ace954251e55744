"""The scheduler tests' shared set-up: a scheduler over a small KV cache, requests and groups as
the engine builds them, and steps driven by the fake runner (``fake_model.FakeRunner``) with the
step invariants checked every time."""

from __future__ import annotations

from fake_model import FakeRunner

from pagedserve.core.config import SchedulerConfig
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.scheduler import Scheduler, SchedulerOutput
from pagedserve.plugins.policies.scheduling import FCFSPolicy

BLOCK = 4
VOCAB = 50


def make_scheduler(
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    policy=None,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=enable_prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(config, kv, policy or FCFSPolicy(), max_model_len)


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8, **kwargs) -> Request:
    params_fields = {k: kwargs.pop(k) for k in list(kwargs) if k in SamplingParams.__dataclass_fields__}
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **params_fields), **kwargs)


def make_group(request_id: str, prompt: list[int], n: int, max_tokens: int = 8) -> Request:
    """An ``n > 1`` request as the engine builds it: a leader and its siblings waiting to fork."""
    params = SamplingParams(n=n, max_tokens=max_tokens)
    leader = Request(f"{request_id}-0", prompt, params, parent_id=request_id)
    for index in range(1, n):
        sibling = Request(f"{request_id}-{index}", prompt, params, parent_id=request_id, index=index)
        sibling.fork_leader = leader
        sibling.status = RequestStatus.WAITING_FOR_FORK
        leader.fork_children.append(sibling)
    return leader


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    output = scheduler.schedule()
    config = scheduler.config
    assert output.total_num_scheduled_tokens == sum(s.num_new_tokens for s in output.scheduled)
    assert output.total_num_scheduled_tokens <= config.max_num_batched_tokens
    assert len(output.scheduled) <= config.max_num_seqs
    assert len({s.request.request_id for s in output.scheduled}) == len(output.scheduled)
    scheduler.update_from_output(output, runner.execute(output))
    return output


def run_all(
    scheduler: Scheduler, requests: list[Request], runner: FakeRunner | None = None
) -> list[SchedulerOutput]:
    runner = runner or FakeRunner(scheduler.kv_cache, VOCAB)
    for request in requests:
        scheduler.add_request(request)
    outputs = []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < 500, "the scheduler made no progress"
        outputs.append(step(scheduler, runner))
    assert scheduler.kv_cache.num_used_blocks == 0
    return outputs


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7 + i * 3) % VOCAB for i in range(length)]
