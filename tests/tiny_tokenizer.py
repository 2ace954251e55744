"""A tiny byte-level BPE tokenizer, trained in a few seconds on Python's own standard library.

The tests build tiny models with random weights; this gives them a real transformers tokenizer
(special tokens, a chat template, multi-byte characters split over several tokens) without any
download.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")
BOS, EOS, PAD = SPECIAL_TOKENS
CORPUS_BYTES = 300_000

#: Renders system/user/assistant turns; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus(limit: int = CORPUS_BYTES) -> Iterator[str]:
    """Standard-library sources in sorted order, up to ``limit`` characters in all."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    remaining = limit
    for path in sorted(stdlib.glob("*.py")):
        if remaining <= 0:
            return
        text = path.read_text(encoding="utf-8", errors="replace")[:remaining]
        remaining -= len(text)
        yield text


def train_tokenizer(directory: Path, vocab_size: int = 512) -> Path:
    """Train a byte-level BPE with exactly ``vocab_size`` tokens and save it to ``directory``
    in transformers' format (``<s>`` = 0, ``</s>`` = 1, ``<pad>`` = 2). Returns ``directory``."""
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (specials + 256 bytes)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"trained {tokenizer.get_vocab_size()} tokens instead of {vocab_size}: "
            "the corpus is too small for this vocabulary"
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    wrapped.chat_template = CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(directory)
    return directory
