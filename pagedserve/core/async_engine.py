"""AsyncLLMEngine: one background thread steps an LLMEngine for many asyncio callers.

The LLMEngine is not thread-safe, so every call into it happens on the engine thread: callers
put commands (add, abort) on a thread-safe queue that the thread drains before each step, and
get their outputs back through an asyncio queue per caller, filled with
``loop.call_soon_threadsafe``. Requests from all callers share each step: continuous batching
across HTTP clients. The thread sleeps on an event while no request is waiting.

The engine is also built on that thread, so that every torch op of the process runs on one
thread: torch's CPU ops parallelise with OpenMP, whose thread team belongs to the thread that
first ran a parallel op, and a second thread's team then shares the cores with the first one's
(measured on 2 cores: a 384 x 2,048 matmul at 4 rows took 167 us on the first thread and 329 us
on a second; the server's 64-request throughput with the engine built on the main thread and
stepped on this one was 0.65-0.75x the same engine built and stepped on one thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.core.config import EngineConfig
from pagedserve.core.engine import LLMEngine, PromptType
from pagedserve.core.lora import LoRARequest
from pagedserve.core.outputs import RequestOutput
from pagedserve.core.plugins import PluginManager, get_plugin_manager
from pagedserve.core.beam_search import BeamSearchParams
from pagedserve.core.sampling_params import SamplingParams

#: How often an idle engine loop checks its runner's health (so /health turns 503 promptly).
IDLE_HEALTH_CHECK_SECONDS = 1.0

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (it failed, or the engine shut down); it serves nothing more."""


class RequestStream:
    """The outputs of the engine requests one caller added together, in the order they come.

    Iterate it for ``RequestOutput`` objects (cumulative, with ``delta_text`` for streaming)
    until every request has finished; ``abort()`` ends the unfinished ones (a client left).
    """

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str]) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._unfinished = set(request_ids)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = self._loop.create_future()

    def _put_threadsafe(self, items: Sequence[RequestOutput | BaseException]) -> None:
        """From the engine thread: hand items to the caller's event loop (gone: dropped)."""
        try:
            self._loop.call_soon_threadsafe(self._put, items)
        except RuntimeError:  # the event loop is closed
            pass

    def _put(self, items: Sequence[RequestOutput | BaseException]) -> None:
        for item in items:
            self._queue.put_nowait(item)

    def _settle_threadsafe(self, error: BaseException | None) -> None:
        """From the engine thread: the requests were added (None) or refused (the error)."""

        def settle() -> None:
            if self.accepted.done():
                return
            if error is None:
                self.accepted.set_result(None)
            else:
                self.accepted.set_exception(error)

        try:
            self._loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while self._unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self._unfinished.discard(item.request_id)
            yield item

    def abort(self) -> None:
        """Abort the requests that have not finished; their KV blocks are freed."""
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()


@dataclass
class _Add:
    stream: RequestStream
    prompts: list[PromptType]
    params: SamplingParams | BeamSearchParams
    lora_request: LoRARequest | None = None


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


class AsyncLLMEngine:
    """Serve an LLMEngine to asyncio code: ``await add_requests(...)``, then iterate the stream.

    ``observers`` are plugin objects with lifecycle hook implementations (``engine_started``,
    ``step_finished``, ``request_finished``, ``engine_shutdown``), such as the server's metrics;
    they are registered before the engine is built and unregistered at shutdown. Their hooks
    run on the engine thread, where reading the engine's state is safe.
    """

    def __init__(
        self,
        config: EngineConfig,
        plugins: PluginManager | None = None,
        observers: Iterable[object] = (),
    ) -> None:
        self.plugins = plugins or get_plugin_manager()
        self._observers = list(observers)
        for observer in self._observers:
            self.plugins.pm.register(observer)
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._started = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._stopping = False
        #: Set (under the lock) once the loop has failed what it still held; no command enters after.
        self._closed = False
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        built: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(config, built), name="pagedserve-engine", daemon=True)
        self._thread.start()
        try:
            self.engine = built.result()
        except BaseException:
            if built.done():  # the build failed (an interrupt while it runs leaves the daemon thread)
                self._thread.join()
            self._unregister_observers()
            raise

    # -- the asyncio side ------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return self._started.is_set() and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Start stepping (until then the thread only runs ``call_before_start`` functions)."""
        self._started.set()
        self._wakeup.set()

    def call_before_start(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread before ``start`` (start-up work that touches
        the model, such as loading LoRA adapters) and return its result or raise its exception."""
        if self._started.is_set():
            raise RuntimeError("call_before_start after start: use call")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Call(fn, future))
        return future.result()

    def check_alive(self) -> None:
        """Raise EngineDeadError unless the loop is running."""
        if not self.is_running:
            reason = f": {self.error!r}" if self.error is not None else ""
            raise EngineDeadError(f"the engine loop is not running{reason}")

    async def add_requests(
        self,
        request_ids: list[str],
        prompts: list[PromptType],
        params: SamplingParams | BeamSearchParams,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Add one request per prompt, all or none: ValueError (nothing added) when the engine
        refuses one. Returns their stream; abort it if the caller stops reading early."""
        self.check_alive()
        stream = RequestStream(self, request_ids)
        self._submit(_Add(stream, prompts, params, lora_request))
        try:
            await stream.accepted
        except asyncio.CancelledError:
            stream.abort()  # queued after the add, so it reaches the engine after it
            raise
        return stream

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps (the engine is not thread-safe)
        and return its result or raise its exception; the loop keeps running either way."""
        self.check_alive()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(_Call(fn, future))
        return await asyncio.wrap_future(future)

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (unknown or finished ids are ignored); thread-safe."""
        self._submit(_Abort(request_ids))

    def _submit(self, command: _Add | _Abort | _Call | None) -> None:
        with self._lock:
            if self._closed:
                if isinstance(command, (_Add, _Call)):
                    raise EngineDeadError("the engine loop is not running")
                return
            self._commands.put(command)
        self._wakeup.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop (pending requests are failed with EngineDeadError) and join it."""
        self._stopping = True
        self._submit(None)
        self._started.set()
        self._thread.join(timeout)
        self._unregister_observers()

    def _unregister_observers(self) -> None:
        for observer in self._observers:
            if self.plugins.pm.is_registered(observer):
                self.plugins.pm.unregister(observer)

    # -- the engine thread -----------------------------------------------------------------------

    def _main(self, config: EngineConfig, built: concurrent.futures.Future[LLMEngine]) -> None:
        """The engine thread: build the engine, run the calls made before ``start``, then step."""
        try:
            self.engine = LLMEngine(config, self.plugins)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(self.engine)
        while not self._started.is_set():
            self._wakeup.wait()
            self._wakeup.clear()
            if not self._started.is_set():
                self._drain_commands()
        self._run()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    # Idle: still notice a runner that broke meanwhile (a worker process died).
                    self._wakeup.wait(IDLE_HEALTH_CHECK_SECONDS)
                    self._wakeup.clear()
                    self.engine.check_health()
                    continue
                self._deliver(self.engine.step())
        except BaseException as exc:
            logger.exception("the engine loop failed; the server answers 503 from now on")
            self.error = exc
        finally:
            self._fail_pending()
            self.engine.shutdown()

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self.engine.abort_request(command.request_ids)
                for request_id in command.request_ids:
                    self._streams.pop(request_id, None)
            elif isinstance(command, _Call):
                try:
                    command.future.set_result(command.fn(self.engine))
                except Exception as exc:
                    command.future.set_exception(exc)

    def _add(self, command: _Add) -> None:
        """Add the requests of one caller, all or none; a refusal goes back to the caller and
        leaves the loop running (ValueError for a bad request, anything else is a bug)."""
        added: list[str] = []
        try:
            for request_id, prompt in zip(command.stream.request_ids, command.prompts):
                if isinstance(command.params, BeamSearchParams):
                    if command.lora_request is not None:
                        raise ValueError("use_beam_search cannot be used with a LoRA adapter yet")
                    self.engine.add_beam_search_request(request_id, prompt, command.params)
                else:
                    self.engine.add_request(request_id, prompt, command.params, lora_request=command.lora_request)
                added.append(request_id)
        except Exception as exc:
            self.engine.abort_request(added)
            command.stream._settle_threadsafe(exc)
            return
        for request_id in added:
            self._streams[request_id] = command.stream
        command.stream._settle_threadsafe(None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand each stream its outputs of this step, in one call per stream."""
        batches: dict[RequestStream, list[RequestOutput]] = defaultdict(list)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            batches[stream].append(output)
            if output.finished:
                del self._streams[output.request_id]
        for stream, items in batches.items():
            stream._put_threadsafe(items)

    def _fail_pending(self) -> None:
        reason = f": {self.error}" if self.error is not None else ""
        error = EngineDeadError(f"the engine stopped before the request finished{reason}")
        with self._lock:
            self._closed = True
        while True:  # adds that never reached the engine
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                command.stream._settle_threadsafe(error)
            elif isinstance(command, _Call):
                command.future.set_exception(error)
        for stream in set(self._streams.values()):
            stream._put_threadsafe([error])
        self._streams.clear()
