"""The corpus the bundled models were trained on: the running interpreter's standard library.

Every Python installation has it, so the training set, and the held-out split the model card's
perplexities are measured on, can be rebuilt anywhere from these rules alone (the same Python
version gives the same files). Stdlib only: importing this module loads no torch.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

#: Folders left out: test suites (many near-duplicate test files), generated data (the pydoc
#: topic blob, the codec tables in ``encodings``) and installed third-party packages.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "pydoc_data", "encodings", "__pycache__"})
#: Every ``HELD_OUT_EVERY``-th file (1-based) of the sorted list is held out, the rest is trained on.
HELD_OUT_EVERY = 20
SPLIT_RULE = (
    'sysconfig.get_paths()["stdlib"], every *.py file (recursively) outside folders named '
    + ", ".join(sorted(EXCLUDED_DIRS))
    + f", sorted by relative POSIX path; file i (0-based) is held out when i % {HELD_OUT_EVERY} == "
    + f"{HELD_OUT_EVERY - 1}, trained on otherwise; each file is one document, read as UTF-8"
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path | None = None) -> list[Path]:
    """Every corpus file, in the split order (sorted by relative POSIX path)."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train, held_out) files, by the rule in ``SPLIT_RULE``."""
    train: list[Path] = []
    held_out: list[Path] = []
    for i, path in enumerate(corpus_files(root)):
        (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(path)
    return train, held_out


def read_document(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def token_stream(encode: Callable[[str], list[int]], paths: Sequence[Path], bos: int, eos: int) -> list[int]:
    """The documents' token ids, each as ``[bos, *encode(text), eos]``, concatenated in order."""
    stream: list[int] = []
    for path in paths:
        stream += [bos, *encode(read_document(path)), eos]
    return stream


def eval_windows(stream: Sequence[int], context: int) -> list[list[int]]:
    """The stream cut into consecutive windows of ``context`` tokens (the last one shorter; one
    of a single token, which predicts nothing, dropped). Perplexity is measured on every token
    of a window but its first, each predicted from the window's tokens before it."""
    windows = [list(stream[i : i + context]) for i in range(0, len(stream), context)]
    return [w for w in windows if len(w) > 1]
