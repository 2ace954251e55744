"""LoRA in the scheduler and the prefix cache, with the fake runner and no model: at most
``max_loras`` adapters a step, nobody starves, and two adapters never share KV."""

from __future__ import annotations

import pytest

from pagedserve.core.config import SchedulerConfig
from pagedserve.core.kv_cache import KVCacheManager
from pagedserve.core.lora import LoRARequest
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sampling_params import SamplingParams
from pagedserve.core.scheduler import Scheduler
from pagedserve.plugins.policies.scheduling import FCFSPolicy

from fake_model import FakeRunner, reference_tokens

BLOCK = 4
VOCAB = 50


def lora(i: int) -> LoRARequest:
    return LoRARequest(f"adapter-{i}", i, f"/adapters/{i}")


def make_scheduler(max_loras: int | None, num_blocks: int = 64, max_num_seqs: int = 8) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=32)
    return Scheduler(config, kv, FCFSPolicy(), 256, max_loras)


def make_request(rid: str, prompt: list[int], adapter: LoRARequest | None, max_tokens: int = 6) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens), lora_request=adapter)


def prompt(seed: int, length: int = 10) -> list[int]:
    return [(seed * 7 + i * 3) % VOCAB for i in range(length)]


def step_adapters(scheduler: Scheduler, runner: FakeRunner) -> set[int]:
    output = scheduler.schedule()
    adapters = {s.request.lora_request.lora_int_id for s in output.scheduled if s.request.lora_request}
    scheduler.update_from_output(output, runner.execute(output))
    return adapters


def test_lora_request_validates_and_keys_the_cache() -> None:
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")
    assert lora(1).cache_key != lora(2).cache_key
    assert make_request("r", [1], None).block_hash_extra_keys is None


@pytest.mark.parametrize("max_loras", [1, 2, 3])
def test_a_step_holds_at_most_max_loras_adapters_and_every_request_finishes(max_loras: int) -> None:
    scheduler = make_scheduler(max_loras)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    requests = []
    for i in range(14):
        adapter = None if i % 4 == 3 else lora(1 + i % 5)
        requests.append(make_request(f"r{i}", prompt(i), adapter))
    for request in requests:
        scheduler.add_request(request)
    steps = 0
    while scheduler.has_unfinished_requests():
        assert steps < 300, "the scheduler made no progress"
        assert len(step_adapters(scheduler, runner)) <= max_loras
        assert len(scheduler.running_lora_adapters) <= max_loras
        steps += 1
    for request in requests:
        assert request.status is RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == reference_tokens(request.prompt_token_ids, 6, VOCAB)
    assert scheduler.kv_cache.num_used_blocks == 0


def test_a_waiting_adapter_is_not_starved_by_a_stream_of_requests_for_a_running_one() -> None:
    scheduler = make_scheduler(max_loras=1)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    scheduler.add_request(make_request("a0", prompt(0), lora(1)))
    step_adapters(scheduler, runner)
    blocked = make_request("b", prompt(1), lora(2))
    scheduler.add_request(blocked)
    assert scheduler.waiting_lora_adapters == ["adapter-2"]
    for i in range(1, 40):
        # Adapter 1 gets a new request every step; adapter 2 must still get its turn.
        scheduler.add_request(make_request(f"a{i}", prompt(i + 1), lora(1)))
        step_adapters(scheduler, runner)
        if blocked.status is not RequestStatus.WAITING:
            break
    assert blocked.status is not RequestStatus.WAITING, "adapter 2 starved"
    assert i <= 8  # a0's 6 tokens, then adapter 2's turn


def test_base_model_requests_pass_a_blocked_adapter() -> None:
    scheduler = make_scheduler(max_loras=1)
    runner = FakeRunner(scheduler.kv_cache, VOCAB)
    scheduler.add_request(make_request("a", prompt(0), lora(1)))
    scheduler.add_request(make_request("b", prompt(1), lora(2)))
    scheduler.add_request(make_request("base", prompt(2), None))
    step_adapters(scheduler, runner)
    assert {r.request_id for r in scheduler.running} == {"a", "base"}
    assert [r.request_id for r in scheduler.waiting] == ["b"]


def test_prefix_cache_blocks_are_shared_per_adapter_only() -> None:
    tokens = list(range(13))
    for first, second, shared in [
        (lora(1), lora(1), True),
        (lora(1), lora(2), False),
        (None, lora(1), False),
        (lora(1), None, False),
        (None, None, True),
    ]:
        scheduler = make_scheduler(max_loras=2)
        runner = FakeRunner(scheduler.kv_cache, VOCAB)
        a = make_request("a", tokens, first, max_tokens=1)
        scheduler.add_request(a)
        while scheduler.has_unfinished_requests():
            step_adapters(scheduler, runner)
        b = make_request("b", tokens, second, max_tokens=1)
        hits, num_hit_tokens = scheduler.kv_cache.get_computed_blocks(b)
        assert (num_hit_tokens == 12) is shared, (first, second)
        assert (num_hit_tokens == 0) is not shared


def test_lora_config_is_validated_with_vllm_names() -> None:
    from pagedserve.core.config import ConfigError, engine_config_from_args

    config = engine_config_from_args("m", enable_lora=True, max_loras=4, max_lora_rank=8)
    assert (config.lora.max_loras, config.lora.max_lora_rank, config.lora.max_cpu_loras) == (4, 8, 4)
    with pytest.raises(ConfigError, match="max_cpu_loras"):
        engine_config_from_args("m", enable_lora=True, max_loras=4, max_cpu_loras=2)
    with pytest.raises(ConfigError, match="max_lora_rank"):
        engine_config_from_args("m", enable_lora=True, max_lora_rank=0)
    with pytest.raises(ConfigError, match="torch_compile"):
        engine_config_from_args("m", enable_lora=True, torch_compile=True)
