"""Tensor parallelism on the CPU: two ranks over gloo against one rank and against transformers.

Starting ranks is the expensive part (a process that imports torch), so each model gets one
tensor-parallel engine for the module, reused by every test that reads it; the shape checks
build the model on the ``meta`` device and start no process at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from prompts import CODE_PROMPTS
from tiny_models import make_tiny_model
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve import LLM, SamplingParams
from pagedserve.core.config import ConfigError
from pagedserve.plugins.quant.quantize_cli import quantize

pytestmark = pytest.mark.slow

PROMPTS = CODE_PROMPTS[:4]
MAX_TOKENS = 20
#: Small enough that the long prompts prefill in chunks and the batch preempts for KV blocks.
ENGINE_ARGS = {
    "dtype": "float32",
    "max_num_batched_tokens": 32,
    "max_num_seqs": 4,
    "num_kv_blocks": 16,
    "block_size": 8,
}
#: name -> (architecture, config overrides, vocabulary size). "llama-gqa" has one key/value head,
#: replicated on both ranks; "mistral" an odd vocabulary (the last rank's rows are padding).
MODELS = {
    "llama-gqa": ("LlamaForCausalLM", {"num_key_value_heads": 1}, 512),
    "llama-mha": ("LlamaForCausalLM", {"num_key_value_heads": 4, "tie_word_embeddings": True}, 512),
    "mistral": ("MistralForCausalLM", {"sliding_window": 8}, 515),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict[str | Path, Path]:
    folders = {}
    for name, (architecture, overrides, vocab) in MODELS.items():
        folder = tmp_path_factory.mktemp(name)
        ids = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
        make_tiny_model(folder, architecture, vocab_size=vocab, **ids, **overrides)
        for item in tokenizer_dir.iterdir():
            shutil.copy(item, folder / item.name)
        folders[name] = folder
    return folders


@pytest.fixture(scope="module")
def engines(model_dirs: dict[str, Path]):
    """``engines(name, tp)``: one LLM per model and size, kept for the module (a process holds
    one tensor-parallel engine at a time, so asking for another shuts the previous one down:
    the tests of one model come together)."""
    built: dict[tuple[str, int], LLM] = {}

    def get(name: str | Path, tp: int) -> LLM:
        folder = str(model_dirs.get(name, name))
        if (folder, tp) not in built:
            if tp > 1:
                for key in [key for key in built if key[1] > 1]:
                    built.pop(key).engine.shutdown()
            built[folder, tp] = LLM(folder, tensor_parallel_size=tp, **ENGINE_ARGS)
        return built[folder, tp]

    yield get
    for llm in built.values():
        llm.engine.shutdown()


def hf_greedy(model_dir: Path, prompts: list[str]) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    results = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, attention_mask=torch.ones_like(ids))
        results.append(out[0, ids.shape[1] :].tolist())
    return results


def greedy(llm: LLM, **params: object) -> list[list[int]]:
    sampling = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, **params)
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, sampling, use_tqdm=False)]


def test_logprobs_close_to_one_rank(engines) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5, prompt_logprobs=3)
    prompts = ["# other prompts than the greedy test's (whose first run must miss the cache)\n" + p for p in PROMPTS[:3]]
    got = engines("llama-gqa", 2).generate(prompts, params, use_tqdm=False)
    expected = engines("llama-gqa", 1).generate(prompts, params, use_tqdm=False)
    for a, b in zip(got, expected):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert step_a.keys() == step_b.keys()
            for token in step_a:
                assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-4
        for step_a, step_b in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            for token in step_a.keys() & step_b.keys():
                assert abs(step_a[token].logprob - step_b[token].logprob) < 1e-4


def test_each_rank_holds_its_share(engines) -> None:
    """Rank 0's layers hold half the heads and half the vocabulary; a single key/value head is
    replicated (each rank caches it); KV capacity is what every rank agreed on."""
    tp2, tp1 = engines("llama-gqa", 2), engines("llama-gqa", 1)
    runner2, runner1 = tp2.engine.runner, tp1.engine.runner
    layer2, layer1 = runner2.attention_layers[0], runner1.attention_layers[0]
    assert (layer2.num_heads, layer2.num_kv_heads) == (layer1.num_heads // 2, 1)
    model2 = runner2.model
    assert model2.model.embed_tokens.weight.shape[0] == 256
    assert model2.model.layers[0].mlp.down_proj.weight.shape[1] == 64
    assert runner2.num_kv_blocks == ENGINE_ARGS["num_kv_blocks"]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_identical_to_one_rank_and_to_transformers(engines, model_dirs, name: str) -> None:
    """Under chunked prefill and preemption (the engine settings force both), then again with the
    prompts' blocks in the prefix cache."""
    tp2 = engines(name, 2)
    scheduler = tp2.engine.scheduler
    preemptions, hits = scheduler.num_preemptions_total, scheduler.prefix_cache_hits
    first = greedy(tp2)
    assert scheduler.num_preemptions_total > preemptions
    assert first == greedy(engines(name, 1))
    assert first == hf_greedy(model_dirs[name], PROMPTS)
    assert greedy(tp2) == first
    assert scheduler.prefix_cache_hits > hits


def quantized_checkpoint(source: Path, out: Path, method: str, *flags: str) -> Path:
    args = [str(source), str(out), "--method", method, "--num-samples", "4", "--seq-len", "32", *flags]
    result = CliRunner().invoke(quantize, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_gptq_checkpoint_shards(engines, tiny_model, tmp_path: Path) -> None:
    """GPTQ without act-order: packed words, groups and zero points split by rank (groups of 32
    over o_proj's 64 and down_proj's 128 input features per rank), greedy as on one rank."""
    source = tiny_model(hidden_size=128, intermediate_size=256)
    folder = quantized_checkpoint(source, tmp_path / "gptq", "gptq", "--group-size", "32", "--no-desc-act")
    assert greedy(engines(folder, 2)) == greedy(engines(folder, 1))
    act_order = quantized_checkpoint(source, tmp_path / "gptq-act-order", "gptq", "--group-size", "32", "--desc-act")
    with pytest.raises(ConfigError, match=r"o_proj: this GPTQ checkpoint uses act-order \(desc_act\)"):
        LLM(str(act_order), tensor_parallel_size=2, dtype="float32")


@pytest.mark.parametrize(
    ("method", "flags"),
    [("awq", ("--group-size", "32")), ("fp8", ("--fp8-scales", "channel")), ("fp8", ("--fp8-scales", "tensor"))],
)
def test_awq_and_fp8_checkpoints_shard(engines, tiny_model, tmp_path: Path, method: str, flags: tuple[str, ...]) -> None:
    """AWQ (packed output words, groups over the row-parallel inputs) and FP8 (per-channel scales
    split with the rows, a per-tensor scale replicated): greedy as on one rank."""
    source = tiny_model(hidden_size=128, intermediate_size=256)
    folder = quantized_checkpoint(source, tmp_path / method, method, *flags)
    assert greedy(engines(folder, 2)) == greedy(engines(folder, 1))


# -- refused up front ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "tp", "message"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 6, "hidden_size": 96}, 4, "qkv_proj: 6 output heads do not divide over tensor_parallel_size=4"),
        ({"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96}, 2, "qkv_proj: 3 output heads do not divide over tensor_parallel_size=2"),
        ({"intermediate_size": 130}, 4, "gate_up_proj: 130 output features do not divide over tensor_parallel_size=4"),
    ],
)
def test_shapes_that_do_not_divide_are_refused(tiny_model, overrides: dict, tp: int, message: str) -> None:
    with pytest.raises(ConfigError, match=f"tensor_parallel_size={tp}: .*{message}"):
        LLM(str(tiny_model(**overrides)), tensor_parallel_size=tp, dtype="float32")


def test_moe_and_unsupported_features_are_refused(tiny_model) -> None:
    moe = tiny_model("MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match="mixture-of-experts layers are not split"):
        LLM(str(moe), tensor_parallel_size=2, dtype="float32")
    with pytest.raises(ConfigError, match="enable_lora cannot be combined with tensor_parallel_size > 1"):
        LLM(str(tiny_model()), tensor_parallel_size=2, enable_lora=True)
    with pytest.raises(ConfigError, match="tensor_parallel_size .3. must be a multiple of nnodes .2."):
        LLM(str(tiny_model()), tensor_parallel_size=3, nnodes=2, master_port=29500)
