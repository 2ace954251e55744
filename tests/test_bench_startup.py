"""``pagedserve bench startup``'s timers, on commands cheaper than pagedserve (the figures
themselves are the benchmark's, not a test's)."""

import sys

import pytest

from pagedserve.bench.startup import IMPORT_TORCH, time_to_first_output


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_first_output_comes_before_the_exit():
    times = time_to_first_output(_python("import time; print('x', flush=True); time.sleep(0.3)"))
    assert 0 < times["first_output_s"] < times["exit_s"]


def test_a_command_that_prints_nothing_is_a_failed_run():
    with pytest.raises(RuntimeError, match="printed nothing"):
        time_to_first_output(_python("pass"))


def test_a_command_that_fails_after_printing_is_a_failed_run():
    with pytest.raises(RuntimeError, match="exited with 3"):
        time_to_first_output(_python("print('x'); raise SystemExit(3)"))


def test_the_torch_floor_is_timed_like_the_commands():
    assert time_to_first_output(IMPORT_TORCH)["first_output_s"] > 0
