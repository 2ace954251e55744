"""Every fenced code block of README.md and docs/*.md, checked as written.

The convention (docs authors: read this). A block is checked by its language:

- ``python``: run, against the bundled model where it loads one. All runnable blocks run in one
  worker process (each block in a fresh namespace, so a block must define what it uses), and
  each must finish without an exception.
- ``bash`` / ``sh`` / ``console``: every line that starts with ``pagedserve`` (after an optional
  ``$ ``) is parsed by the real command line (an unknown subcommand or flag fails), without
  running it; the other lines (make, pip, curl, kubectl) are not checked.
- ``toml`` and ``json``: parsed. ``text`` and untagged blocks (output, layouts): not checked.

An HTML comment on the line right before the opening fence changes that:

- ``<!-- docs-test: skip REASON -->``: the block is not checked; REASON is required and says why
  it cannot run in CI (a GPU, several machines, Kubernetes, a long-running server, a checkpoint
  that is not here, a fragment of a larger program).
- ``<!-- docs-test: server -->`` (python): run while a ``pagedserve serve`` of the bundled model
  is up; ``127.0.0.1:8000`` in the block is replaced by that server's address.
- ``<!-- docs-test: run -->`` (bash): run the whole block with ``bash -e`` in the repository
  root, with the test's virtualenv first on PATH (keep such blocks short).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([A-Za-z0-9_+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(skip|server|run)\b\s*(.*?)\s*-->\s*$")
SHELLS = ("bash", "sh", "console", "shell")


@dataclass
class Block:
    path: Path
    line: int
    language: str
    code: str
    marker: str | None = None
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract(path: Path) -> list[Block]:
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, language = i, match.group(1).lower()
        i += 1
        body = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        block = Block(path, start + 1, language, "\n".join(body) + "\n")
        marker = MARKER.match(lines[start - 1].strip()) if start > 0 else None
        if marker is not None:
            block.marker, block.reason = marker.group(1), marker.group(2)
        blocks.append(block)
        i += 1
    return blocks


BLOCKS = [block for path in DOCS for block in extract(path)]


def test_markers_are_well_formed() -> None:
    bad = [b.name for b in BLOCKS if b.marker == "skip" and not b.reason]
    assert not bad, f"a skip marker needs a reason: {bad}"
    wrong = [b.name for b in BLOCKS if (b.marker == "server" and b.language != "python")
             or (b.marker == "run" and b.language not in SHELLS)]
    assert not wrong, f"server marks python blocks, run marks shell blocks: {wrong}"


def checked(language: tuple[str, ...], marker: str | None = None) -> list[Block]:
    return [b for b in BLOCKS if b.language in language and b.marker == marker]


def _cli() -> click.Group:
    from pagedserve.cli import _add_interactive_commands, _add_plugin_commands, cli

    _add_interactive_commands()
    _add_plugin_commands()
    return cli


def _command_lines(code: str) -> list[str]:
    """The ``pagedserve ...`` commands of a shell block, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.strip().removeprefix("$ ")
        if re.match(r"pagedserve(\s|$)", line):
            commands.append(line)
    return commands


def _words(command: str) -> list[str]:
    """The arguments of one command: up to a pipe or ``&&``, without redirections, and with the
    brackets of ``[--optional FLAG]`` notation dropped (the flag inside is checked)."""
    words: list[str] = []
    tokens = iter(shlex.split(command, comments=True)[1:])
    for word in tokens:
        if word in ("|", "&&", ";", "||"):
            break
        if word in ("<", ">", ">>", "2>"):
            next(tokens, None)
            continue
        if word.startswith(("<", ">")):
            continue
        word = word.strip("[]")
        if word:
            words.append(word)
    return words


def _left_for_subcommand(ctx: click.Context) -> list[str]:
    """The words a group's context left for its subcommand: Click 8 keeps the subcommand's name
    apart (its ``protected_args``, deprecated since 8.2), Click 9 leaves all of them in ``args``."""
    return [*getattr(ctx, "_protected_args", ()), *ctx.args]


@pytest.mark.parametrize("block", checked(SHELLS), ids=lambda b: b.name)
def test_shell_commands_parse(block: Block) -> None:
    cli = _cli()
    for command in _command_lines(block.code):
        words = _words(command)
        try:
            with cli.make_context("pagedserve", list(words), resilient_parsing=False) as ctx:
                group_args = _left_for_subcommand(ctx)
                while isinstance(ctx.command, click.Group) and group_args:
                    sub = ctx.command.get_command(ctx, group_args[0])
                    assert sub is not None, f"{block.name}: no command {group_args[0]!r} in {command!r}"
                    ctx = sub.make_context(group_args[0], group_args[1:], parent=ctx)
                    group_args = _left_for_subcommand(ctx) if isinstance(sub, click.Group) else []
        except click.exceptions.Exit:
            pass  # --help, --version
        except click.UsageError as exc:
            pytest.fail(f"{block.name}: {command!r} does not parse: {exc.format_message()}")


@pytest.mark.parametrize("block", checked(SHELLS, "run"), ids=lambda b: b.name)
def test_shell_blocks_marked_run(block: Block) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-e", "-c", block.code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{block.name}:\n{result.stdout}\n{result.stderr}"


@pytest.mark.parametrize("block", checked(("toml", "json")), ids=lambda b: b.name)
def test_data_blocks_parse(block: Block) -> None:
    if block.language == "toml":
        tomllib.loads(block.code)
    else:
        json.loads(block.code)


RUNNER = r"""
import json, sys, traceback
failures = {}
for name, code in json.load(sys.stdin):
    try:
        exec(compile(code, name, "exec"), {"__name__": "__docs__"})
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print("\n@@failures@@" + json.dumps(failures))
"""


def run_python_blocks(blocks: list[Block], replace: dict[str, str] | None = None) -> None:
    """Run the blocks in one worker process from the repository root (docs name paths from it)."""
    payload = []
    for block in blocks:
        code = block.code
        for old, new in (replace or {}).items():
            code = code.replace(old, new)
        payload.append((block.name, code))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(payload), capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.rpartition("@@failures@@")[2])
    assert not failures, "\n\n".join(f"{name}:\n{error}" for name, error in failures.items())


def test_python_blocks_run() -> None:
    run_python_blocks(checked(("python",)))


def test_python_blocks_against_a_server(tmp_path_factory: pytest.TempPathFactory) -> None:
    from server_process import free_port, start_server

    blocks = checked(("python",), "server")
    if not blocks:
        pytest.skip("no block is marked server")
    log = tmp_path_factory.mktemp("docs-server") / "server.log"
    server = start_server([sys.executable, "-m", "pagedserve", "serve"], log, free_port(), timeout=300)
    try:
        run_python_blocks(blocks, {"127.0.0.1:8000": f"127.0.0.1:{server.port}"})
    finally:
        server.stop()
