"""Shared fixtures: real rawjobs servers as subprocesses on 127.0.0.1.

``server`` is one default server per test (in-memory store, concurrency 3).
``start_server(*args, db=..., env=...)`` starts more, with any command-line options;
every process started is stopped (SIGKILL if needed) when the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running ``python -m rawjobs``: ``url`` (``http://127.0.0.1:PORT``), ``port``,
    ``ws_url`` (the /ws/queue URL), ``proc`` and its log file."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/queue"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url + "/api/stats", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("server did not start in time")


def launch(workdir: Path, *args: str, db: str = ":memory:", port: int | None = None,
           env: dict[str, str] | None = None, ready: bool = True) -> ServerProcess:
    """Start ``python -m rawjobs`` in ``workdir`` (its log there too). With
    ``RAWJOBS_TEST_LOOP=uvloop`` in the environment every server runs on uvloop."""
    port = port or free_port()
    log_path = workdir / f"server-{port}-{time.monotonic_ns()}.log"
    loop = os.environ.get("RAWJOBS_TEST_LOOP")
    cmd = [sys.executable, "-m", "rawjobs", "--port", str(port), "--db", db,
           "--log-level", "info", *(["--loop", loop] if loop else []), *args]
    proc = subprocess.Popen(
        cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=str(workdir), env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    server = ServerProcess(proc, port, log_path, list(args))
    if ready:
        wait_ready(server.url, proc)
    return server


def stop(server: ServerProcess, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def start_server(tmp_path):
    started: list[ServerProcess] = []

    def start(*args: str, db: str = ":memory:", port: int | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              ready: bool = True) -> ServerProcess:
        server = launch(cwd or tmp_path, *args, db=db, port=port, env=env, ready=ready)
        started.append(server)
        return server

    yield start
    for server in started:
        stop(server)


@pytest.fixture(scope="module")
def start_module_server(tmp_path_factory):
    """Like ``start_server``, for servers shared by a whole module (stateless checks
    that need not pay for a server each)."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = launch(tmp_path_factory.mktemp("server"), *args)
        started.append(server)
        return server

    yield start
    for server in started:
        stop(server)


@pytest.fixture
def server(start_server) -> ServerProcess:
    """The default server (in-memory store, concurrency 3). ``--grace 0`` only so that
    stopping it at teardown does not wait for long jobs a test leaves running."""
    return start_server("--grace", "0")


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


# -- PostgreSQL (issue 7) --------------------------------------------------------------

sys.path.insert(0, str(ROOT / "scripts"))
from pgserver import create_database, pg_bin, private_postgres  # noqa: E402


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for the whole session, on its own port and data
    directory; yields ``postgresql://postgres@127.0.0.1:PORT``. Fails (never skips)
    when PostgreSQL is missing: scripts/test installs it."""
    try:
        pg_bin()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with private_postgres() as dsn:
        yield dsn


_databases = iter(range(1, 1_000_000))


@pytest.fixture
def pg_dsn(postgres) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    return create_database(postgres, f"test_{os.getpid()}_{next(_databases)}")
