"""The tensor-parallel worker processes: started by rank 0 (multiprocessing spawn), each runs its
shard of every step's forward and holds its share of the KV cache; only rank 0 schedules and
samples.

Each step rank 0 broadcasts a ``ForwardBatch`` (plain lists) on the gloo group; every rank then
runs the same ``ModelRunner.run_forward``, whose layers meet in all-reduces and gathers. A worker
that raises reports its traceback through a queue and exits non-zero; a monitor thread on rank 0
notices any worker's exit at once, and the collective rank 0 is blocked in (if any) fails as the
dead peer's sockets close, so the engine raises ``WorkerFailedError`` instead of hanging.
Workers leave when rank 0 sends ``None`` (shutdown) or when rank 0 itself is gone.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from pagedserve.core.config import ConfigError
from pagedserve.distributed import parallel_state

if TYPE_CHECKING:
    from pagedserve.core.config import EngineConfig

logger = logging.getLogger(__name__)

#: How long a worker is given to leave after the shutdown message, before it is terminated.
JOIN_SECONDS = 10.0
#: How long rank 0 waits, after a collective failed, for the monitor to name the worker that died.
DIAGNOSE_SECONDS = 5.0
#: How often a worker checks that rank 0 (its parent) is still alive.
PARENT_POLL_SECONDS = 1.0


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker died or raised; the engine cannot continue."""


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def init_method_for(config: EngineConfig) -> str:
    parallel = config.parallel
    port = parallel.master_port if parallel.master_port is not None else free_port(parallel.master_addr)
    return f"tcp://{parallel.master_addr}:{port}"


def check_shards(config: EngineConfig) -> None:
    """Build the model as every rank, on the ``meta`` device (no memory), so a size that does not
    divide is refused before any process starts, with the layer and the sizes in the message."""
    from pagedserve.core.loader import build_model

    world = config.parallel.tensor_parallel_size
    model = config.model
    for rank in range(world):
        with parallel_state.assumed_rank(rank, world):
            try:
                build_model(model.hf_config, config.quantization, model.dtype, "meta", folder=model.model_path)
            except ValueError as exc:
                raise ConfigError(f"this model cannot run with tensor_parallel_size={world}: {exc}") from None


def worker_main(config: EngineConfig, rank: int, init_method: str, errors: Any) -> None:
    """A worker process: join the group, build this rank's runner, run steps until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops everyone
    _leave_with_parent()
    world = config.parallel.tensor_parallel_size
    try:
        from pagedserve.core.model_runner import ModelRunner
        from pagedserve.core.plugins import get_plugin_manager

        parallel_state.mark_worker_process()
        parallel_state.init_tensor_parallel(rank, world, init_method, config.device.resolved())
        runner = ModelRunner(config, get_plugin_manager())
        while True:
            batch = parallel_state.broadcast_object()
            if batch is None:
                break
            runner.run_forward(batch)
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        errors.close()
        errors.join_thread()  # the report must leave before the process does
        sys.stderr.flush()
        os._exit(1)  # no clean-up: the group is broken, and rank 0 handles the rest
    parallel_state.destroy_tensor_parallel()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to finalize; interpreter teardown would take seconds


def _leave_with_parent() -> None:
    """Exit when rank 0 is gone (killed without a chance to stop us): no orphaned workers."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="pagedserve-parent-watch", daemon=True).start()


class WorkerGroup:
    """Rank 0's handle on its workers: started, sent each step's batch, watched, stopped."""

    def __init__(self, config: EngineConfig) -> None:
        parallel = config.parallel
        self.world_size = parallel.tensor_parallel_size
        check_shards(config)
        if parallel_state.is_initialized():
            raise ConfigError(
                "another tensor-parallel engine is running in this process; shut it down first "
                "(torch.distributed holds one process group per process)"
            )
        init_method = init_method_for(config)
        context = multiprocessing.get_context("spawn")
        self._errors = context.Queue()
        self.processes: dict[int, multiprocessing.process.BaseProcess] = {}
        for rank in parallel.local_ranks()[1:]:
            process = context.Process(
                target=worker_main,
                args=(config, rank, init_method, self._errors),
                name=f"pagedserve-tp-worker-{rank}",
                daemon=True,
            )
            process.start()
            self.processes[rank] = process
        self.failure: str | None = None
        self._stopping = False
        self._monitor = threading.Thread(target=self._watch, name="pagedserve-tp-monitor", daemon=True)
        self._monitor.start()
        atexit.register(self.shutdown)  # before multiprocessing's own exit handler kills them
        logger.info(
            "tensor parallelism: %d ranks over %s (worker pids %s)",
            self.world_size, init_method, [p.pid for p in self.processes.values()],
        )
        try:
            parallel_state.init_tensor_parallel(0, self.world_size, init_method, config.device.resolved())
        except BaseException as exc:
            self.shutdown()
            raise self.error_for(exc) from exc

    # -- the steps ---------------------------------------------------------------------------------

    def send_step(self, batch: Any) -> None:
        self.check()
        parallel_state.broadcast_object(batch)

    def check(self) -> None:
        if self.failure is not None:
            raise WorkerFailedError(self.failure)

    def error_for(self, exc: BaseException) -> BaseException:
        """The error to raise for ``exc`` from a collective: the worker's failure when one died
        (waiting briefly for the monitor to see it), else ``exc`` itself."""
        deadline = time.monotonic() + DIAGNOSE_SECONDS
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.failure is None:
            return exc
        return WorkerFailedError(self.failure)

    # -- watching ----------------------------------------------------------------------------------

    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in self.processes.items()}
        while sentinels and not self._stopping:
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            if self._stopping or not ready:
                continue
            rank = sentinels[ready[0]]
            self.failure = self._describe(rank)
            logger.error("%s", self.failure)
            return

    def _describe(self, rank: int) -> str:
        process = self.processes[rank]
        process.join(1.0)
        reports: dict[int, str] = {}
        while True:
            try:
                reported_rank, text = self._errors.get(timeout=0.5 if not reports else 0.05)
            except queue.Empty:
                break
            reports[reported_rank] = text
        if rank in reports or reports:
            failed = rank if rank in reports else next(iter(reports))
            last = reports[failed].strip().splitlines()[-1]
            return f"tensor-parallel worker rank {failed} failed: {last}\n{reports[failed]}"
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        return f"tensor-parallel worker rank {rank} (pid {process.pid}) {how}"

    # -- stopping ----------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every worker: ask them to leave (when the group still works), then terminate
        what is left; idempotent."""
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.shutdown)
        if self.failure is None and parallel_state.is_initialized():
            try:
                parallel_state.broadcast_object(None)
            except Exception:  # noqa: BLE001 - a broken group: terminate below
                logger.warning("could not tell the workers to stop; terminating them")
        deadline = time.monotonic() + JOIN_SECONDS
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join()
        if self.failure is None:
            parallel_state.destroy_tensor_parallel()
        else:
            parallel_state.forget_tensor_parallel()
        self._errors.close()


def run_headless(config: EngineConfig) -> int:
    """A machine other than node 0 (``--headless``): run this machine's ranks until they stop;
    returns the exit status (the first failed rank's, else 0). SIGINT/SIGTERM stop them."""
    from pagedserve.core.loader import get_model_max_len, load_hf_config, resolve_model_path

    parallel = config.parallel
    if parallel.node_rank == 0:
        raise ConfigError("--headless is for the machines with node_rank >= 1; node 0 runs the server")
    model = config.model
    model.model_path = resolve_model_path(model.model, model.revision)
    model.hf_config = load_hf_config(model.model_path)
    config.finalize(get_model_max_len(model.hf_config))
    check_shards(config)
    init_method = init_method_for(config)
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    processes = [
        context.Process(target=worker_main, args=(config, rank, init_method, errors), name=f"pagedserve-tp-worker-{rank}")
        for rank in parallel.local_ranks()
    ]
    for process in processes:
        process.start()
    logger.info("headless node %d: ranks %s, joining %s", parallel.node_rank, parallel.local_ranks(), init_method)

    def stop(signum: int, frame: Any) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    status = 0
    pending = list(processes)
    while pending:
        multiprocessing.connection.wait([p.sentinel for p in pending])
        for process in [p for p in pending if not p.is_alive()]:
            pending.remove(process)
            process.join()
            if process.exitcode and not status:
                status = 1
                stop(signal.SIGTERM, None)  # one rank failed: the group is broken, stop the rest
    return status
