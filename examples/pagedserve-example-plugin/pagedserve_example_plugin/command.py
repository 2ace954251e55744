"""``pagedserve banned-ids WORD ...``: the token ids to pass as ``banned_token_ids``."""

from __future__ import annotations

import json

import click


@click.command("banned-ids")
@click.option("--model", default=None, help="The model whose tokenizer to use (default: the bundled model).")
@click.argument("words", nargs=-1, required=True)
def banned_ids(model: str | None, words: tuple[str, ...]) -> None:
    """Print the vllm_xargs that ban every token of WORDS (with and without a leading space)."""
    from pagedserve.cli import default_model
    from pagedserve.core.loader import resolve_model_path
    from pagedserve.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model_path(model or default_model()))
    ids = sorted({i for word in words for text in (word, " " + word) for i in tokenizer.encode(text, add_special_tokens=False)})
    click.echo(json.dumps({"banned_token_ids": ids}))
