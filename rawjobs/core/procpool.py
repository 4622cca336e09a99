"""A pool of worker processes for CPU-bound job handlers (issue 4).

Each worker process serves one job at a time over a duplex pipe. The parent watches
the pipe with ``loop.add_reader`` (no thread, no polling): progress messages are
forwarded to the job's ``report`` callback as they arrive. Cancelling the awaiting
task (job cancel, timeout, shutdown) terminates the process (SIGTERM, then SIGKILL
after ``kill_grace`` seconds); a fresh one replaces it on the next run.

The handler is sent by reference (module and qualified name) and imported in the
child, so it must be a module-level function of an importable module.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("rawjobs.procpool")
_MP = multiprocessing.get_context("spawn")


class ProcessJobError(Exception):
    """The handler raised in the worker process; the message is its ``str``."""


class SyncJobContext:
    """The context a process handler gets: ``params``, ``job_id``, ``attempt``,
    ``progress(percent, message)`` and ``sleep(seconds)``, all plain calls."""

    def __init__(self, conn: Any, job_id: int, params: dict[str, Any], attempt: int) -> None:
        self._conn = conn
        self.job_id = job_id
        self.params = params
        self.attempt = attempt

    def progress(self, percent: float, message: str = "") -> None:
        from .jobs import clamp_percent

        self._conn.send(("progress", clamp_percent(percent), str(message)))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class AsyncProcessJobContext(SyncJobContext):
    """The context of an ``async def`` handler registered with ``executor="process"``:
    it runs on its own event loop in the worker process, so ``progress`` and
    ``sleep`` are coroutines, as on the server's loop."""

    async def progress(self, percent: float, message: str = "") -> None:  # type: ignore[override]
        SyncJobContext.progress(self, percent, message)

    async def sleep(self, seconds: float) -> None:  # type: ignore[override]
        await asyncio.sleep(seconds)


def _call(fn: Callable[..., Any], conn: Any, job_id: int, params: dict[str, Any],
          attempt: int) -> Any:
    if inspect.iscoroutinefunction(fn):
        return asyncio.run(fn(AsyncProcessJobContext(conn, job_id, params, attempt)))
    return fn(SyncJobContext(conn, job_id, params, attempt))


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _child_main(conn: Any) -> None:
    """Worker process: run ``("run", module, qualname, job_id, params, attempt)``
    requests one after another until the pipe closes. It runs at a lower CPU
    priority than the server, so CPU-bound jobs never starve the event loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(10)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        _, module, qualname, job_id, params, attempt = request
        try:
            result = _call(_resolve(module, qualname), conn, job_id, params, attempt)
            reply = ("result", result)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            reply = ("error", str(exc) or type(exc).__name__, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception as exc:  # e.g. an unpicklable result
            conn.send(("error", f"Job result could not be sent: {exc}", ""))


class _Proc:
    def __init__(self) -> None:
        self.conn, child_conn = _MP.Pipe(duplex=True)
        self.process = _MP.Process(target=_child_main, args=(child_conn,), daemon=True,
                                   name="rawjobs-job")
        self.process.start()
        child_conn.close()


class ProcessPool:
    """Runs plain-function handlers in worker processes; at most ``max_idle`` idle
    processes are kept warm. ``kill_grace``: seconds between SIGTERM and SIGKILL."""

    def __init__(self, max_idle: int | None = None, kill_grace: float = 1.0) -> None:
        self.max_idle = max_idle or os.cpu_count() or 2
        self.kill_grace = kill_grace
        self._idle: list[_Proc] = []
        self._busy: set[_Proc] = set()
        self._retiring: dict[_Proc, asyncio.TimerHandle] = {}

    async def run(
        self,
        handler: Callable[..., Any],
        job_id: int,
        params: dict[str, Any],
        attempt: int,
        report: Callable[[int, str], None],
    ) -> Any:
        """Run ``handler(ctx)`` in a worker process and return its result.

        Raises ProcessJobError when the handler raises or the process dies;
        cancellation terminates the process."""
        proc = self._idle.pop() if self._idle else _Proc()
        self._busy.add(proc)
        healthy = False
        try:
            proc.conn.send(("run", handler.__module__, handler.__qualname__,
                            job_id, params, attempt))
            result = await self._wait(proc, report)
            healthy = True
            return result
        finally:
            self._busy.discard(proc)
            if healthy and len(self._idle) < self.max_idle:
                self._idle.append(proc)
            else:
                self._retire(proc)

    async def _wait(self, proc: _Proc, report: Callable[[int, str], None]) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        fd = proc.conn.fileno()

        def readable() -> None:
            try:
                while not done.done() and proc.conn.poll():
                    self._handle(proc.conn.recv(), done, report)
            except (EOFError, OSError):
                proc.process.join(0.1)  # it has closed its end: it is exiting
                code = proc.process.exitcode
                done.set_exception(ProcessJobError(f"Worker process died (exit code {code})"))

        loop.add_reader(fd, readable)
        try:
            return await done
        finally:
            loop.remove_reader(fd)

    @staticmethod
    def _handle(message: tuple[Any, ...], done: asyncio.Future[Any],
                report: Callable[[int, str], None]) -> None:
        kind = message[0]
        if kind == "progress":
            report(message[1], message[2])
        elif kind == "result":
            done.set_result(message[1])
        else:
            log.error("process job failed:\n%s", message[2])
            done.set_exception(ProcessJobError(message[1]))

    def _retire(self, proc: _Proc) -> None:
        """Terminate a process that may still be working; SIGKILL if it lingers
        ``kill_grace`` seconds (or at ``close``, whichever comes first)."""
        proc.conn.close()
        if not proc.process.is_alive():
            proc.process.join(0)
            return
        proc.process.terminate()
        loop = asyncio.get_running_loop()
        self._retiring[proc] = loop.call_later(self.kill_grace, self._reap, proc)

    def _reap(self, proc: _Proc) -> None:
        self._retiring.pop(proc, None)
        if proc.process.is_alive():
            proc.process.kill()
        proc.process.join(1.0)

    def close(self) -> None:
        """Stop every worker process: SIGTERM, ``kill_grace`` seconds, then SIGKILL
        (a handler that ignores SIGTERM cannot keep the server from exiting)."""
        for handle in self._retiring.values():
            handle.cancel()
        procs = self._idle + list(self._busy) + list(self._retiring)
        for proc in procs:
            proc.conn.close()
            if proc.process.is_alive():
                proc.process.terminate()
        deadline = time.monotonic() + self.kill_grace
        for proc in procs:
            proc.process.join(max(0.0, deadline - time.monotonic()))
            if proc.process.is_alive():
                proc.process.kill()
                proc.process.join(1.0)
        self._idle.clear()
        self._busy.clear()
        self._retiring.clear()
