"""Build a tiny random Llama with a tokenizer trained on Python's standard library.

    python scripts/make_tiny_model.py OUT_DIR

Used by ``make run`` until the bundled default model exists; the tests use the same builders.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tiny_models import make_tiny_model  # noqa: E402
from tiny_tokenizer import train_tokenizer  # noqa: E402


def main(out: Path) -> None:
    if (out / "config.json").exists():
        return
    make_tiny_model(out, "LlamaForCausalLM", vocab_size=512, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with tempfile.TemporaryDirectory() as tmp:
        for item in train_tokenizer(Path(tmp), 512).iterdir():
            shutil.copy(item, out / item.name)
    print(f"tiny random model written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".tiny-model"))
