"""Padded decode steps from persistent buffers (the CUDA-graph path, run on the CPU without
capture): transformers' greedy tokens exactly, padding rows kept out of real requests' blocks,
and the settings that turn capture on and off."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM
from pagedserve.core.config import ConfigError, engine_config_from_args
from pagedserve.core.cuda_graphs import DecodeBuffers, capture_sizes, cuda_graph_reason
from test_engine_vs_hf import CONFIGS, MAX_TOKENS, PROMPTS, greedy, hf_greedy


def _count_padded_steps(llm: LLM) -> list[int]:
    """Record the padded size of every step the padded path runs."""
    padded = llm.engine.runner.padded_decode
    sizes: list[int] = []
    run = padded.run

    def counting(token_ids, positions, block_ids, size):
        sizes.append(size)
        return run(token_ids, positions, block_ids, size)

    padded.run = counting
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_padded_decode_gives_transformers_tokens(tiny_model, name: str) -> None:
    """Five requests decode padded to 8 (three padding rows), then fewer as they finish; with a
    budget of 8 tokens a step the prefill chunks run eagerly between padded decode steps."""
    architecture, overrides = CONFIGS[name]
    model_dir = tiny_model(architecture, **overrides)
    expected = hf_greedy(model_dir, PROMPTS, MAX_TOKENS)
    llm = LLM(str(model_dir), dtype="float32", cuda_graph_sizes=[2, 8], max_num_seqs=8)
    sizes = _count_padded_steps(llm)
    assert greedy(llm, PROMPTS) == expected
    assert 8 in sizes and len(sizes) >= MAX_TOKENS - 1
    chunked = LLM(str(model_dir), dtype="float32", cuda_graph_sizes=[1, 2, 4], max_num_seqs=4,
                  max_num_batched_tokens=8, block_size=4)
    sizes = _count_padded_steps(chunked)
    assert greedy(chunked, PROMPTS) == expected
    assert set(sizes) <= {1, 2, 4} and len(sizes) >= MAX_TOKENS - 1


@pytest.mark.slow
def test_padded_decode_under_preemption_and_prefix_caching(tiny_model) -> None:
    """Few blocks: requests are preempted and recomputed between padded steps; the padding
    block is never one the scheduler hands out, so the shared prefix blocks stay intact."""
    model_dir = tiny_model()
    shared = PROMPTS[1] * 2
    prompts = [shared + " a", shared + " b", *PROMPTS]
    expected = hf_greedy(model_dir, prompts, MAX_TOKENS)
    llm = LLM(str(model_dir), dtype="float32", cuda_graph_sizes=[4], max_num_seqs=4, block_size=4,
              num_kv_blocks=48)
    sizes = _count_padded_steps(llm)
    assert greedy(llm, prompts) == expected
    assert sizes and llm.engine.scheduler.num_preemptions_total > 0
    runner = llm.engine.runner
    assert runner.kv_caches[0].shape[1] == runner.num_kv_blocks + 1
    assert llm.engine.kv_cache.num_used_blocks == 0


def test_decode_buffers_pad_into_their_own_block() -> None:
    buffers = DecodeBuffers(max_size=4, max_blocks_per_seq=3, block_size=4, pad_block=9, device=torch.device("cpu"))
    # Request 0 decodes position 5 (its second block, 7), request 1 position 0 of block 3 (its
    # lookahead block 8 is not needed yet).
    seq_lens = buffers.write([11, 12], [5, 0], [[2, 7], [3, 8]], size=4)
    assert seq_lens == [6, 1, 1, 1]
    assert buffers.input_ids.tolist() == [11, 12, 0, 0]
    assert buffers.slot_mapping.tolist() == [7 * 4 + 1, 3 * 4, 9 * 4, 9 * 4]
    assert buffers.block_tables.tolist() == [[2, 7, 0], [3, 0, 0], [9, 0, 0], [9, 0, 0]]
    layout = buffers.layout(4, seq_lens, max_seq_len=12)
    assert layout.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert layout.num_computed_tokens.tolist() == [5, 0, 0, 0]
    assert layout.max_seq_len == 12 and layout.max_query_len == 1
    # Request 0's blocks 2, 7 are not consecutive; request 1's (and a padding row's) one block is.
    assert layout.first_blocks_if_consecutive == [None, 3, 9, 9]
    buffers.write([11], [9], [[4, 5, 6]], size=1)
    assert buffers.layout(1, [10], max_seq_len=12).first_blocks_if_consecutive == [4]
    buffers.write([11], [7], [[4, 5, 9]], size=1)  # the block past position 7 is not read
    assert buffers.layout(1, [8], max_seq_len=12).first_blocks_if_consecutive == [4]


def _config(**kwargs: object):
    config = engine_config_from_args("m", **kwargs)
    config.finalize(256)
    return config


def test_capture_sizes_follow_vllm() -> None:
    assert capture_sizes(_config(max_num_seqs=256)) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(_config(max_num_seqs=20)) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(_config(max_num_seqs=64, cuda_graph_sizes=[12])) == [1, 2, 4, 8, 12]
    assert capture_sizes(_config(max_num_seqs=64, cuda_graph_sizes=[32, 3, 100])) == [3, 32]


def test_cuda_graph_settings_are_validated_and_explained() -> None:
    with pytest.raises(ConfigError, match="cuda_graph_sizes"):
        _config(cuda_graph_sizes=[])
    with pytest.raises(ConfigError, match="cuda_graph_sizes"):
        _config(cuda_graph_sizes=[4, 0])
    with pytest.raises(ConfigError, match="enforce_eager"):
        _config(enforce_eager="yes")

    class Capturable:
        name = "k"
        supports_cuda_graphs = True

    class HostPlanned:
        name = "torch_ref"
        supports_cuda_graphs = False

    cuda = torch.device("cuda")
    assert cuda_graph_reason(_config(), cuda, Capturable()) is None
    assert "enforce_eager" in cuda_graph_reason(_config(enforce_eager=True), cuda, Capturable())
    assert "torch_ref" in cuda_graph_reason(_config(), cuda, HostPlanned())
    assert "enable_lora" in cuda_graph_reason(_config(enable_lora=True), cuda, Capturable())
    assert "cpu" in cuda_graph_reason(_config(), torch.device("cpu"), Capturable())


def test_a_capture_failure_says_to_start_eagerly(tiny_model, monkeypatch) -> None:
    from pagedserve.core import model_runner
    from pagedserve.core.cuda_graphs import PaddedDecode

    def fail(self) -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(model_runner, "cuda_graph_reason", lambda config, device, backend: None)
    monkeypatch.setattr(PaddedDecode, "capture_all", fail)
    with pytest.raises(ConfigError, match="stream is capturing.*--enforce-eager"):
        LLM(str(tiny_model()), dtype="float32", max_num_seqs=4)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "inductor", "packed"), [("llama-gqa", {}, False), ("mistral-window", {}, False),
                                                          ("llama-gqa", {"freezing": True}, False),
                                                          ("llama-gqa", {}, True)])
def test_compiled_cpu_decode_gives_transformers_tokens(tiny_model, monkeypatch, name: str, inductor: dict,
                                                       packed: bool) -> None:
    """compilation_config level 3 on the CPU: the padded decode steps run the inductor graph of
    their size (one size here, compiles are slow), attention traced into it, with transformers'
    greedy tokens in fp32 (a sliding window shorter than the prompts too); the fifth request's
    prefill runs eagerly between them. Contexts grow over several blocks of 4 and the graph
    compiled at start-up serves them all (the block-table axis is symbolic). With inductor's
    ``freezing`` (weights folded in as constants, prepacked for oneDNN) the KV caches, which are
    not parameters, must still be written and read at run time. ``packed``: every dense weight
    packed for oneDNN (whatever the load-time timing says), so the graph calls the opaque
    ``pagedserve::packed_linear`` op."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    from pagedserve.core.layers import cpu_gemm

    if packed:
        monkeypatch.setattr(cpu_gemm, "packed_from_rows", lambda weight, packed, timer=None: 1)

    architecture, overrides = CONFIGS[name]
    model_dir = tiny_model(architecture, **overrides)
    expected = hf_greedy(model_dir, PROMPTS, MAX_TOKENS)
    # Two values are taken as they are (one would mean 1, 2, 4); 64 is above max_num_seqs, dropped.
    llm = LLM(str(model_dir), dtype="float32", compilation_config={"level": 3, "inductor_compile_config": inductor},
              cuda_graph_sizes=[4, 64], max_num_seqs=4, block_size=4)
    padded = llm.engine.runner.padded_decode
    assert padded.sizes == [4] and padded.forward is not llm.engine.runner.model and padded.traced
    sizes = _count_padded_steps(llm)
    graphs = counters["stats"]["unique_graphs"]
    with profile() as prof:
        assert greedy(llm, PROMPTS) == expected
    calls = {event.key for event in prof.key_averages()}
    assert ("pagedserve::packed_linear" in calls) == packed
    assert set(sizes) == {4} and len(sizes) >= MAX_TOKENS // 2
    assert counters["stats"]["unique_graphs"] == graphs


def test_compilation_config_takes_vllm_levels_and_refuses_the_rest() -> None:
    from pagedserve.core.compiled_decode import default_compile_sizes

    assert _config().compilation_level == 0
    assert _config(compilation_config=3).compilation_level == 3
    assert _config(compilation_config={"level": 0}).compilation_level == 0
    for value, message in ((1, "level 1 is not supported"), ({"level": 2}, "level 2"),
                           ({"level": 3, "backend": "eager"}, "'backend'"), ("3", "level '3'"),
                           ({"inductor_compile_config": {"freezing": True}}, "needs level 3"),
                           ({"level": 3, "inductor_compile_config": ["freezing"]}, "object of inductor options")):
        with pytest.raises(ConfigError, match=message):
            _config(compilation_config=value)
    with pytest.raises(ConfigError, match="enforce_eager.*compilation_config"):
        _config(compilation_config=3, enforce_eager=True)
    options = {"freezing": True, "cpp.weight_prepack": True}
    assert _config(compilation_config={"level": 3, "inductor_compile_config": options}).inductor_compile_config == options
    assert default_compile_sizes(256) == [1, 2, 4, 8, 16, 32, 64]
    assert default_compile_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert default_compile_sizes(1) == [1]


def test_compiled_decode_is_refused_off_the_cpu(tiny_model, monkeypatch) -> None:
    """Off the CPU decode steps are CUDA graphs: level 3 is refused there (the device faked)."""
    from pagedserve.core.config import DeviceConfig

    monkeypatch.setattr(DeviceConfig, "resolved", lambda self: "cuda")
    with pytest.raises(ConfigError, match="compiles the CPU decode step.*'cuda'"):
        LLM(str(tiny_model()), dtype="float32", compilation_config=3)


@pytest.mark.parametrize(("options", "message"), [({"no_such_option": 1}, "Unexpected optimization option no_such_option$"),
                                                  ({"freezing": "yes"}, "freezing, got str")])
def test_an_option_inductor_refuses_is_a_config_error(tiny_model, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"inductor_compile_config: .*{message}"):
        LLM(str(tiny_model()), dtype="float32", compilation_config={"level": 3, "inductor_compile_config": options},
            cuda_graph_sizes=[1, 2])


def test_each_compiled_decode_has_its_own_code_and_room_for_its_sizes() -> None:
    """Each compiled engine's graphs hang on a forward code object of its own (another engine
    cannot reach them), and dynamo's limit of graphs a code object has room for its sizes."""
    from torch import nn

    from pagedserve.core.compiled_decode import compile_decode
    from pagedserve.plugins.attention.torch_ref.backend import TorchRefBackend

    with torch._dynamo.config.patch(recompile_limit=8):
        steps = [compile_decode(nn.Linear(2, 2), 11, TorchRefBackend.__new__(TorchRefBackend)) for _ in range(2)]
        assert torch._dynamo.config.recompile_limit == 11
        codes = [step._orig_mod.forward.__code__ for step in steps]
        assert codes[0] is not codes[1] and codes[0] != codes[1]


@pytest.mark.slow
def test_compiled_engines_of_the_same_shapes_run_their_own_graphs(tiny_model) -> None:
    """The compiled step's guards skip the model (``step_guard_filter``), so two engines whose
    models have the same shapes and differ in a setting traced into the graph as a constant (the
    norms' epsilon) and in their weights must not share graphs: each gives its own
    transformers tokens."""
    architecture, overrides = CONFIGS["llama-gqa"]
    models = [tiny_model(architecture, **overrides),
              tiny_model(architecture, **overrides, rms_norm_eps=0.5, initializer_range=0.2)]
    expected = [hf_greedy(model, PROMPTS, MAX_TOKENS) for model in models]
    assert expected[0] != expected[1]
    llms = [LLM(str(model), dtype="float32", compilation_config=3, cuda_graph_sizes=[4, 64], max_num_seqs=4,
                block_size=4) for model in models]
    assert [greedy(llm, PROMPTS) for llm in llms] == expected
