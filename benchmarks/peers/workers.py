"""One in-process peer system of the peer benchmark, as a long-lived worker: started once with a
model, then each line on stdin is a workload (JSON: ``prompts`` as token-id lists and
``output_lens``), each line on stdout the time it took. Standard library only at the top, so each
system's own virtualenv runs it (pagedserve's, CTranslate2's, transformers').

    python workers.py pagedserve|ctranslate2|transformers MODEL_DIR THREADS

Every system generates greedily exactly ``output_lens[i]`` tokens for prompt ``i`` (ignoring EOS):
pagedserve and transformers per request; CTranslate2 has no per-request length in one batch, so its
batch runs to the longest and only the requested tokens count (a static batch, as its API gives).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


class PagedServe:
    def __init__(self, model: str, extra: dict[str, Any]) -> None:
        from pagedserve import LLM

        self.llm = LLM(model, max_num_seqs=64, max_model_len=512, **extra)

    def run(self, prompts: list[list[int]], output_lens: list[int]) -> int:
        from pagedserve import SamplingParams

        params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)


class CTranslate2:
    def __init__(self, model: str, extra: dict[str, Any]) -> None:
        import ctranslate2

        self.generator = ctranslate2.Generator(model, device="cpu", intra_threads=extra["threads"],
                                               compute_type=extra.get("compute_type", "float32"))
        with open(f"{model}/vocabulary.json") as f:
            self.vocabulary = json.load(f)

    def run(self, prompts: list[list[int]], output_lens: list[int]) -> int:
        longest = max(output_lens)
        results = self.generator.generate_batch(
            [[self.vocabulary[t] for t in p] for p in prompts],
            max_length=longest,
            min_length=longest,
            sampling_topk=1,
            include_prompt_in_result=False,
            max_batch_size=64,
        )
        return sum(min(len(r.sequences_ids[0]), n) for r, n in zip(results, output_lens))


class Transformers:
    """``generate`` one request at a time (greedy, exactly the requested length)."""

    def __init__(self, model: str, extra: dict[str, Any]) -> None:
        import torch
        import transformers

        self.torch = torch
        dtype = getattr(torch, extra.get("dtype", "float32"))
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()

    def run(self, prompts: list[list[int]], output_lens: list[int]) -> int:
        tokens = 0
        with self.torch.inference_mode():
            for prompt, n in zip(prompts, output_lens):
                ids = self.torch.tensor([prompt])
                out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=0)
                tokens += out.shape[1] - ids.shape[1]
        return tokens


SYSTEMS = {"pagedserve": PagedServe, "ctranslate2": CTranslate2, "transformers": Transformers}


def main() -> None:
    system, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    import torch

    torch.set_num_threads(threads)
    if system == "ctranslate2":
        extra["threads"] = threads
    worker = SYSTEMS[system](model, extra)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        tokens = worker.run(job["prompts"], job["output_lens"])
        print(json.dumps({"seconds": time.perf_counter() - start, "output_tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
