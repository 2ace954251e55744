"""Tokenizing, chat-template rendering and detokenizing of requests, off the event loop.

These are CPU work proportional to the request (a megabyte prompt takes seconds): run inside an
async handler they would stall every other client, ``/health`` included. ``TokenizerPool`` runs
them on a few threads, each with its own tokenizer (a transformers fast tokenizer is not made
to be shared between threads that may change its padding or truncation state).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


class TokenizerPool:
    """``await pool.run(fn, *args)`` calls ``fn(tokenizer, *args)`` on a pool thread."""

    def __init__(self, load: Callable[[], PreTrainedTokenizerBase], num_threads: int) -> None:
        self._load = load
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="pagedserve-tokenizer")

    def _call(self, fn: Callable[..., T], *args: object) -> T:
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = self._load()
        return fn(tokenizer, *args)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
