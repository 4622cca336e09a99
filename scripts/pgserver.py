"""A private, throw-away PostgreSQL server for tests, benchmarks and trying rawjobs
with several nodes: its own data directory and port, run as the ``postgres`` user
when started by root (PostgreSQL refuses to run as root).

    python scripts/pgserver.py            # prints a DSN, runs until Ctrl+C

Needs Debian's ``postgresql`` package (``apt-get install postgresql``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory; RuntimeError if none."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql")
    return found[-1].parent


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def private_postgres(max_connections: int = 300) -> Iterator[str]:
    """Start a server on 127.0.0.1 (``fsync=off``: for tests only); yields
    ``postgresql://postgres@127.0.0.1:PORT``; stops it and deletes its data after."""
    bin_dir = pg_bin()
    base = Path(tempfile.mkdtemp(prefix="rawjobs-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    data, port = base / "data", _free_port()
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-A", "trust",
                                 "-U", "postgres"]), check=True, capture_output=True)
    options = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
               f" -c max_connections={max_connections}")
    subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
                                 "-l", str(base / "log"), "-w", "start"]),
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                                     "immediate", "-t", "10", "stop"]), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def create_database(server: str, name: str) -> str:
    """Create database ``name`` on ``server``; returns its DSN."""
    subprocess.run(["psql", server + "/postgres", "-q", "-c", f"CREATE DATABASE {name}"],
                   check=True, capture_output=True)
    return f"{server}/{name}"


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)  # clean up on SIGTERM as on Ctrl+C
    signal.signal(signal.SIGINT, _stop)
    with private_postgres() as server:
        print(create_database(server, "rawjobs"), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
