"""The offline API, shaped like vLLM's ``LLM`` so users can switch."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedserve.core.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from pagedserve.core.config import engine_config_from_args
from pagedserve.core.engine import LLMEngine, PromptType
from pagedserve.core.lora import LoRARequest
from pagedserve.core.outputs import EmbeddingRequestOutput, RequestOutput
from pagedserve.core.pooling import PoolingParams
from pagedserve.core.sampling_params import RequestOutputKind, SamplingParams
from pagedserve.core.tokenizer import apply_chat_template

Messages = list[dict[str, Any]]


class LLM:
    """Generate from a batch of prompts in-process: ``LLM(model).generate(prompts, params)``.

    Keyword arguments are vLLM's engine argument names (``dtype``, ``max_model_len``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``block_size``, ``num_kv_blocks``,
    ``kv_cache_memory_bytes``, ``enable_prefix_caching``, ``attention_backend``, ``seed``, ...).
    """

    def __init__(self, model: str, **engine_args: Any) -> None:
        self.engine = LLMEngine(engine_config_from_args(model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A prompt is a string, ``{"prompt_token_ids": [...]}`` or ``{"prompt": "..."}``. A bad
        prompt raises ValueError before anything runs. ``lora_request``: one adapter for every
        prompt, or one (or None: the base model) per prompt.
        """
        prompts = _prompt_list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts; "
                    "give one, or one per prompt"
                )
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(
                    f"got {len(loras)} LoRA requests for {len(prompts)} prompts; give one, or one per prompt"
                )
        # As vLLM's LLM does: only the final outputs are read, so the engine reports no other.
        params_list = [dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params_list]
        return self._run(prompts, params_list, use_tqdm, priority, loras)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """The embedding of every prompt (``output.outputs.embedding``), in prompt order, pooled
        as the engine's ``pooler_config`` says. Embedding requests share the engine's steps with
        generation; each frees its KV blocks once its prompt is computed."""
        prompts = _prompt_list(prompts)
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            params_list = [pooling_params or PoolingParams()] * len(prompts)
        else:
            params_list = list(pooling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} pooling params for {len(prompts)} prompts")
        return self._run(prompts, params_list, use_tqdm, None, [None] * len(prompts))  # type: ignore[return-value]

    def beam_search(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: BeamSearchParams,
        use_tqdm: bool = False,
    ) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: per prompt, the ``beam_width`` best beams (tokens and
        text including the prompt), best first. The beams of a prompt share its KV blocks."""
        prompts = _prompt_list(prompts)
        engine = self.engine
        order: dict[str, int] = {}
        try:
            for i, prompt in enumerate(prompts):
                request_id = str(next(self._ids))
                engine.add_beam_search_request(request_id, prompt, params)
                order[request_id] = i
        except Exception:
            engine.abort_request(list(order))
            raise
        outputs = self._collect(order, use_tqdm)
        tokenizer = engine.tokenizer
        results = []
        for output in outputs:
            sequences = []
            for completion in output.outputs:
                tokens = [*output.prompt_token_ids, *completion.token_ids]
                sequences.append(
                    BeamSearchSequence(
                        tokens=tokens,
                        logprobs=completion.logprobs or [],
                        cum_logprob=completion.cumulative_logprob or 0.0,
                        text=tokenizer.decode(tokens, skip_special_tokens=True),
                        finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason,
                    )
                )
            results.append(BeamSearchOutput(sequences))
        return results

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {
                "prompt_token_ids": apply_chat_template(
                    self.engine.tokenizer,
                    conversation,  # type: ignore[arg-type]
                    add_generation_prompt=add_generation_prompt,
                    chat_template_kwargs=chat_template_kwargs,
                )
            }
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)

    def _run(
        self,
        prompts: list[PromptType],
        params_list: list[SamplingParams] | list[PoolingParams],
        use_tqdm: bool,
        priority: Sequence[int] | None,
        loras: list[LoRARequest | None],
    ) -> list[RequestOutput]:
        engine = self.engine
        order: dict[str, int] = {}
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = str(next(self._ids))
                engine.add_request(
                    request_id, prompt, params, priority=priority[i] if priority else 0, lora_request=loras[i]
                )
                order[request_id] = i
        except Exception:
            engine.abort_request(list(order))
            raise
        return self._collect(order, use_tqdm)

    def _collect(self, order: dict[str, int], use_tqdm: bool) -> list[RequestOutput]:
        """Step until every request of ``order`` (id -> position) finished; outputs in order."""
        engine = self.engine
        results: list[RequestOutput | None] = [None] * len(order)
        pending = set(order)
        try:
            with tqdm(total=len(order), desc="Processed prompts", disable=not use_tqdm) as progress:
                while pending:
                    for output in engine.step():
                        if output.finished and output.request_id in pending:
                            results[order[output.request_id]] = output
                            pending.discard(output.request_id)
                            progress.update(1)
        except BaseException:
            engine.abort_request(list(pending))
            raise
        return results  # type: ignore[return-value]


def _prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    """One prompt (text, token ids or a dict) or a list of them, as a list."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]
