"""``pagedserve chat`` and ``pagedserve complete``: interactive clients, as ``vllm chat`` and
``vllm complete`` are. With ``--url`` they talk to a running OpenAI-compatible server through the
official ``openai`` client; without it they start the engine in-process on ``--model`` (the
bundled model by default). Each line read from stdin is one turn; replies stream as they come.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, Protocol

import click

from pagedserve.cli import default_model, engine_args, engine_options

#: Lines that end a session (as does the end of stdin).
EXIT_WORDS = ("exit", "quit")


class Backend(Protocol):
    """Where the text comes from: a server (``RemoteBackend``) or an engine in this process."""

    def chat(self, messages: list[dict[str, str]]) -> Iterator[str]: ...

    def complete(self, prompt: str) -> Iterator[str]: ...


class RemoteBackend:
    """A running server, through the ``openai`` client (streamed chat and completions)."""

    def __init__(self, url: str, api_key: str | None, model_name: str | None, sampling: dict[str, Any]) -> None:
        import openai

        self._errors = (openai.APIError,)
        self.client = openai.OpenAI(base_url=url, api_key=api_key or "EMPTY", max_retries=0)
        self.sampling = {k: v for k, v in sampling.items() if v is not None}
        try:
            self.model = model_name or self.client.models.list().data[0].id
        except openai.AuthenticationError as exc:
            raise click.ClickException(f"the server at {url} refused the API key: give it with --api-key") from exc
        except openai.APIConnectionError as exc:
            raise click.ClickException(f"no server answers at {url} ({exc}); start one or fix --url") from exc

    def _stream(self, create: Any, text_of: Any, **request: Any) -> Iterator[str]:
        try:
            for chunk in create(model=self.model, stream=True, **self.sampling, **request):
                if chunk.choices and (text := text_of(chunk.choices[0])):
                    yield text
        except self._errors as exc:
            raise click.ClickException(f"the server refused the request: {exc}") from exc

    def chat(self, messages: list[dict[str, str]]) -> Iterator[str]:
        return self._stream(self.client.chat.completions.create, lambda c: c.delta.content, messages=messages)

    def complete(self, prompt: str) -> Iterator[str]:
        return self._stream(self.client.completions.create, lambda c: c.text, prompt=prompt)


class LocalBackend:
    """An ``LLMEngine`` in this process, stepped until each reply is done."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], sampling: dict[str, Any]) -> None:
        from pagedserve.core.config import engine_config_from_args
        from pagedserve.core.engine import LLMEngine
        from pagedserve.core.loader import ModelLoadError
        from pagedserve.core.plugins import PluginError
        from pagedserve.core.sampling_params import RequestOutputKind, SamplingParams, generation_config_defaults

        try:
            self.engine = LLMEngine(engine_config_from_args(model, **engine_kwargs))
            # As the server does: the model's generation_config.json sampling defaults, then the flags.
            defaults = generation_config_defaults(self.engine.generation_config)
            given = {k: v for k, v in sampling.items() if v is not None}
            self.params = SamplingParams(**{**defaults, **given}, output_kind=RequestOutputKind.DELTA)
        except (ValueError, ModelLoadError, PluginError) as exc:
            raise click.ClickException(str(exc)) from exc
        self._turns = 0

    def _run(self, prompt: Any) -> Iterator[str]:
        self._turns += 1
        request_id = f"turn-{self._turns}"
        try:
            self.engine.add_request(request_id, prompt, self.params)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        try:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.outputs[0].text:
                        yield output.outputs[0].text
        finally:
            if self.engine.has_unfinished_requests():  # the caller stopped reading (Ctrl-C)
                self.engine.abort_request(request_id)

    def chat(self, messages: list[dict[str, str]]) -> Iterator[str]:
        from pagedserve.core.tokenizer import apply_chat_template

        try:
            token_ids = apply_chat_template(self.engine.tokenizer, messages)
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
        return self._run({"prompt_token_ids": token_ids})

    def complete(self, prompt: str) -> Iterator[str]:
        return self._run(prompt)


def _sampling_options(func: Any) -> Any:
    options = [
        click.option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens a reply has."),
        click.option("--temperature", type=float, default=None, help="Default: the model's generation_config."),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--repetition-penalty", type=float, default=None),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client_options(func: Any) -> Any:
    options = [
        click.option("--url", default=None,
                     help="A running server's API, e.g. http://127.0.0.1:8000/v1 (default: an engine in-process)."),
        click.option("--model-name", default=None, help="With --url: the model to ask (default: the server's first)."),
        click.option("--api-key", envvar="OPENAI_API_KEY", default=None,
                     help="With --url: the server's --api-key (or set OPENAI_API_KEY)."),
        click.option("--model", default=None, help="In-process: HF model folder or hub id (default: the bundled model)."),
        click.option("-q", "--quick", default=None, metavar="TEXT", help="Send TEXT once, print the reply and exit."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _sampling(remote: bool, **values: Any) -> dict[str, Any]:
    """The sampling flags given; for a server, vLLM's extra fields (``top_k``,
    ``repetition_penalty``) go in the request body as the ``openai`` client sends them."""
    given = {k: v for k, v in values.items() if v is not None}
    if not remote:
        return given
    extra = {k: given.pop(k) for k in ("top_k", "repetition_penalty") if k in given}
    return {**given, "extra_body": extra} if extra else given


def _backend(url: str | None, model_name: str | None, api_key: str | None, model: str | None,
             sampling: dict[str, Any], kwargs: dict[str, Any]) -> Backend:
    if url is not None:
        if model is not None:
            raise click.UsageError("--model starts an engine in-process; with --url name the server's model with --model-name")
        return RemoteBackend(url, api_key, model_name, sampling)
    if model_name is not None:
        raise click.UsageError("--model-name needs --url (in-process, give the model with --model)")
    args = engine_args(kwargs)
    if args["max_num_seqs"] is None:  # one conversation: a cache and a warm-up for one sequence
        args["max_num_seqs"] = 1
    return LocalBackend(model or default_model(), args, sampling)  # type: ignore[arg-type]


def _turns(quick: str | None) -> Iterator[str]:
    """The user's lines: ``--quick`` once, else stdin until EOF or an exit word. A prompt (``> ``)
    is shown only when stdin is a terminal."""
    if quick is not None:
        yield quick
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            return
        line = line.rstrip("\n")
        if line.strip().lower() in EXIT_WORDS:
            return
        if line.strip():
            yield line


def _print_stream(pieces: Iterator[str]) -> str:
    text = []
    for piece in pieces:
        click.echo(piece, nl=False)
        sys.stdout.flush()
        text.append(piece)
    click.echo()
    return "".join(text)


@click.command()
@_client_options
@click.option("--system-prompt", default=None, help="A system message at the start of the conversation.")
@_sampling_options
@engine_options
def chat(url: str | None, model_name: str | None, api_key: str | None, model: str | None, quick: str | None,
         system_prompt: str | None, max_tokens: int, temperature: float | None, top_p: float | None,
         top_k: int | None, repetition_penalty: float | None, **kwargs: Any) -> None:
    """Chat with a model: each line of stdin is a user message, the reply streams back, and the
    conversation (history) is sent with every turn. ``exit``, ``quit`` or end of input stop."""
    sampling = _sampling(url is not None, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, repetition_penalty=repetition_penalty)
    backend = _backend(url, model_name, api_key, model, sampling, kwargs)
    messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for line in _turns(quick):
        messages.append({"role": "user", "content": line})
        reply = _print_stream(backend.chat(messages))
        messages.append({"role": "assistant", "content": reply})


@click.command()
@_client_options
@_sampling_options
@engine_options
def complete(url: str | None, model_name: str | None, api_key: str | None, model: str | None, quick: str | None,
             max_tokens: int, temperature: float | None, top_p: float | None, top_k: int | None,
             repetition_penalty: float | None, **kwargs: Any) -> None:
    """Complete prompts: each line of stdin is a prompt, completed on its own (no history)."""
    sampling = _sampling(url is not None, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, repetition_penalty=repetition_penalty)
    backend = _backend(url, model_name, api_key, model, sampling, kwargs)
    for line in _turns(quick):
        _print_stream(backend.complete(line))
