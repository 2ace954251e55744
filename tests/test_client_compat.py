"""The clients people point at a vLLM server, each driving the shared test server as its docs
say: LangChain's ``ChatOpenAI`` (invoke and stream), LiteLLM (completion and streaming) and
lm-eval's ``local-completions`` on a small local loglikelihood task, whose scores must equal a
transformers forward within 1e-4. (The openai SDK drives every route in the other server tests.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from server_process import API_KEY, ENGINE_ARGS
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.slow

# LiteLLM fetches a price list from the internet at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

SYSTEM = "You write Python."
QUESTION = "Sort a list."
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model()


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> str:
    """The offline engine's greedy reply to the conversation."""
    llm = LLM(str(model_dir), **ENGINE_ARGS)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    (output,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return output.outputs[0].text


def test_langchain_chat_openai_invoke_and_stream(server, model_dir, expected) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=str(model_dir), base_url=f"{server.url}/v1", api_key=API_KEY,
        temperature=0, max_tokens=MAX_TOKENS, max_retries=0,
    )
    messages = [("system", SYSTEM), ("human", QUESTION)]
    reply = chat.invoke(messages)
    assert reply.content == expected
    assert reply.usage_metadata["output_tokens"] >= 1
    assert "".join(chunk.content for chunk in chat.stream(messages)) == expected


def test_litellm_completion_and_streaming(server, model_dir, expected) -> None:
    import litellm

    kwargs = {
        "model": f"openai/{model_dir}", "api_base": f"{server.url}/v1", "api_key": API_KEY,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        "temperature": 0, "max_tokens": MAX_TOKENS,
    }
    response = litellm.completion(**kwargs)
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens >= 1
    pieces = [chunk.choices[0].delta.content or "" for chunk in litellm.completion(**kwargs, stream=True)]
    assert "".join(pieces) == expected


DOCS = [
    {"context": "def fibonacci(n):\n", "continuation": "    return n"},
    {"context": "import os\nimport", "continuation": " sys"},
    {"context": "class Config:\n    def", "continuation": " __init__(self):"},
]


def write_task(folder: Path) -> str:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    task = {
        "task": "pagedserve_tiny_loglikelihood",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{continuation}}",
        "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
    }
    (folder / "task.yaml").write_text(json.dumps(task))  # YAML is a superset of JSON
    return task["task"]


def test_lm_eval_local_completions_scores_equal_transformers(
    server, model_dir, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # local-completions sends it as the bearer token
    task = write_task(tmp_path)
    # As lm-eval's docs say for a vLLM server; the remote tokenizer reads /tokenizer_info.
    lm = get_model("local-completions").create_from_arg_string(
        f"model={model_dir},base_url={server.url}/v1/completions,tokenizer_backend=remote,"
        "tokenized_requests=True,num_concurrent=1,max_retries=1"
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True
    )
    samples = results["samples"][task]
    assert len(samples) == len(DOCS)

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for sample in samples:
        doc = sample["doc"]
        context_ids, continuation_ids = lm._encode_pair(doc["context"], doc["continuation"])
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
        positions = range(len(context_ids) - 1, ids.shape[1] - 1)
        want = sum(logprobs[p, ids[0, p + 1]].item() for p in positions)
        greedy = all(logprobs[p].argmax().item() == ids[0, p + 1].item() for p in positions)
        ((score, is_greedy),) = sample["filtered_resps"]
        assert abs(score - want) < 1e-4, (doc, score, want)
        assert bool(is_greedy) == greedy
