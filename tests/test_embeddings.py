"""Offline embeddings (``LLM.embed``) against the same pooling over transformers' last hidden
state: LAST and MEAN, normalised or not, in chunks, from the prefix cache, and batched in the
same steps as generation without changing its tokens or keeping a KV block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedserve import LLM, PoolingParams, SamplingParams
from pagedserve.core.config import ConfigError

pytestmark = pytest.mark.slow

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n" * 6, "x = 1"]
ARGS = {"dtype": "float32", "max_model_len": 256, "max_num_seqs": 8}


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model()


def expected(model_dir: Path, prompt: str, pooling_type: str, normalize: bool) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
    pooled = hidden.mean(dim=0) if pooling_type == "MEAN" else hidden[-1]
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
def test_embed_equals_pooled_transformers_hidden_states(model_dir, pooling_type) -> None:
    # 16-token steps: the long prompt is embedded in chunks.
    llm = LLM(str(model_dir), **ARGS, max_num_batched_tokens=16, pooler_config={"pooling_type": pooling_type})
    for normalize in (True, False):
        outputs = llm.embed(PROMPTS, PoolingParams(normalize=normalize), use_tqdm=False)
        assert [o.prompt_token_ids for o in outputs] == [llm.get_tokenizer().encode(p) for p in PROMPTS]
        for prompt, output in zip(PROMPTS, outputs):
            want = expected(model_dir, prompt, pooling_type, normalize)
            got = torch.tensor(output.outputs.embedding)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # The same prompt again: LAST reads its blocks from the prefix cache, MEAN recomputes.
    again = llm.embed(PROMPTS[1], use_tqdm=False)[0]
    torch.testing.assert_close(torch.tensor(again.outputs.embedding), expected(model_dir, PROMPTS[1], pooling_type, True))
    assert (again.num_cached_tokens > 0) == (pooling_type == "LAST")
    assert llm.engine.kv_cache.usage == 0.0


def test_embeddings_share_steps_with_generation_without_changing_it(model_dir) -> None:
    llm = LLM(str(model_dir), **ARGS)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = llm.generate(PROMPTS, params, use_tqdm=False)
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"gen{i}", prompt, params)
    engine.step()  # the generations are decoding when the embeddings arrive
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"emb{i}", prompt, PoolingParams())
    finished = {}
    mixed_steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        kinds = {o.request_id[:3] for o in outputs}
        mixed_steps += kinds == {"gen", "emb"}
        finished.update({o.request_id: o for o in outputs if o.finished})
    assert mixed_steps >= 1  # one step served both
    for i, prompt in enumerate(PROMPTS):
        assert finished[f"gen{i}"].outputs[0].token_ids == alone[i].outputs[0].token_ids
        want = expected(model_dir, prompt, "LAST", True)
        torch.testing.assert_close(torch.tensor(finished[f"emb{i}"].outputs.embedding), want, atol=1e-5, rtol=1e-4)
    assert engine.kv_cache.usage == 0.0


def test_bad_embedding_requests_are_refused(model_dir) -> None:
    llm = LLM(str(model_dir), **ARGS)
    hidden = llm.engine.config.model.hf_config.hidden_size
    assert len(llm.embed("x", PoolingParams(dimensions=hidden), use_tqdm=False)[0].outputs.embedding) == hidden
    with pytest.raises(ValueError, match="matryoshka"):
        llm.embed("x", PoolingParams(dimensions=8), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.embed("", use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions must be a positive integer"):
        PoolingParams(dimensions=0)
    with pytest.raises(ConfigError, match="pooling_type 'CLS' is not supported"):
        LLM(str(model_dir), **ARGS, pooler_config={"pooling_type": "CLS"})
    assert not llm.engine.has_unfinished_requests()
