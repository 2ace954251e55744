"""A Llama config.json read by the model class itself (``LlamaForCausalLM.config_from_dict``,
no transformers config class imported) reads as transformers' ``LlamaConfig`` does: the same
values for every key, the same built model, and everything it may not read left to AutoConfig.
The generate path's imports are checked in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.activations import ACT2FN

from pagedserve.assets import bundled_model_path
from pagedserve.core.layers.activation import TORCH_ACTIVATIONS, get_act_fn
from pagedserve.core.layers.rotary import rope_parameters_from_config
from pagedserve.core.loader import (
    ModelLoadError,
    build_model,
    get_model_max_len,
    initialize_dummy_weights,
    load_hf_config,
    resolve_dtype,
)
from pagedserve.plugins.models.config_file import ModelConfigFile
from pagedserve.plugins.models.llama.model import LLAMA_DEFAULTS, LlamaForCausalLM

BUNDLED = json.loads((bundled_model_path("pagedserve/tiny-py") / "config.json").read_text())
SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}

CONFIGS = {
    "bundled (transformers 5 keys)": BUNDLED,
    "older keys (rope_theta, torch_dtype)": {**SMALL, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
                                             "num_key_value_heads": 2, "tie_word_embeddings": True},
    "defaults only": SMALL,
    "explicit head_dim, biases": {**SMALL, "head_dim": 32, "attention_bias": True, "mlp_bias": True,
                                  "rms_norm_eps": 1e-5, "max_position_embeddings": 128, "dtype": "float32"},
}


def write(folder: Path, values: dict[str, Any]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(values))
    return str(folder)


def test_the_defaults_are_llama_configs() -> None:
    reference = LlamaConfig()
    for key, value in LLAMA_DEFAULTS.items():
        if key not in ("head_dim", "num_key_value_heads", "rope_parameters"):  # derived, below
            assert getattr(reference, key) == value, key


@pytest.mark.parametrize("values", CONFIGS.values(), ids=CONFIGS.keys())
def test_read_as_transformers_reads_it(values: dict[str, Any], tmp_path: Path) -> None:
    path = write(tmp_path, values)
    ours = load_hf_config(path)
    theirs = AutoConfig.from_pretrained(path)
    assert isinstance(ours, ModelConfigFile)
    for key in {*LLAMA_DEFAULTS, *values} - {"rope_parameters", "rope_theta", "dtype", "torch_dtype"}:
        assert getattr(ours, key) == getattr(theirs, key), key
    assert rope_parameters_from_config(ours) == rope_parameters_from_config(theirs)
    assert get_model_max_len(ours) == get_model_max_len(theirs)
    for dtype in ("auto", "float32"):
        assert resolve_dtype(dtype, ours, "cpu") == resolve_dtype(dtype, theirs, "cpu")
    assert ours._name_or_path == theirs._name_or_path

    built = [build_model(config, None, "float32", "cpu") for config in (ours, theirs)]
    for model in built:
        initialize_dummy_weights(model, seed=0)
    (ours_state, theirs_state) = (model.state_dict() for model in built)
    assert ours_state.keys() == theirs_state.keys()
    for name, tensor in ours_state.items():  # parameters and buffers (RoPE caches) alike
        torch.testing.assert_close(tensor, theirs_state[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "values",
    [
        {**SMALL, "model_type": "mistral"},
        {**SMALL, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},  # transformers rewrites it
        {**SMALL, "auto_map": {"AutoConfig": "x.Config"}},
    ],
    ids=["another model_type", "older rope_scaling", "remote code"],
)
def test_what_it_may_not_read_goes_to_autoconfig(values: dict[str, Any]) -> None:
    assert LlamaForCausalLM.config_from_dict(values) is None


def test_the_tokenizer_given_the_config_is_the_one_autotokenizer_loads() -> None:
    from transformers import AutoTokenizer

    from pagedserve.core.tokenizer import apply_chat_template, load_tokenizer

    folder = str(bundled_model_path("pagedserve/tiny-py"))
    given = load_tokenizer(folder, model_config=load_hf_config(folder))
    alone = AutoTokenizer.from_pretrained(folder)
    assert type(given) is type(alone)
    text = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # é"
    assert given.encode(text) == alone.encode(text)
    assert given.all_special_ids == alone.all_special_ids and given.eos_token_id == alone.eos_token_id
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    assert apply_chat_template(given, messages) == apply_chat_template(alone, messages)


def test_a_config_llama_refuses_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a multiple of the number of attention heads"):
        load_hf_config(write(tmp_path, {**SMALL, "hidden_size": 66}))


@pytest.mark.parametrize("name", [*TORCH_ACTIVATIONS, "gelu_new"])
def test_activations_compute_what_transformers_does(name: str) -> None:
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(get_act_fn(name)(x), ACT2FN[name](x), rtol=0, atol=0)


#: Imported by nothing on the way to generate's first token (each costs start-up time):
#: transformers' config classes, torch.distributed.tensor under them, xgrammar.
NOT_IMPORTED = ("transformers.utils.type_validators", "torch.distributed.tensor", "xgrammar", "accelerate")

PROBE = """
import sys
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine
from pagedserve.core.sampling_params import SamplingParams
engine = LLMEngine(engine_config_from_args("pagedserve/tiny-py", max_num_seqs=1))
engine.add_request("a", "def f(n):", SamplingParams(max_tokens=2))
while engine.has_unfinished_requests():
    engine.step()
print(" ".join(name for name in {names!r} if name in sys.modules))
"""


@pytest.mark.slow
def test_the_generate_path_skips_the_heavy_imports() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(names=NOT_IMPORTED)], capture_output=True,
                          text=True, timeout=300, check=True)
    assert done.stdout.split() == [], done.stdout
