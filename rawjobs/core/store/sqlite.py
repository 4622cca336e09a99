"""SQLite store (the durable default, stdlib ``sqlite3``).

Every call runs on one dedicated thread that owns the connection, so the event loop
never waits on SQLite. The thread takes whatever calls are queued and runs them in
one transaction (group commit), then resolves their futures: under load one commit
serves many jobs, and the inserts and updates of a batch share a few statements (see
rawjobs.core.store.sqlite_batch).

Durability: WAL journal with ``synchronous=NORMAL``. A committed transaction is in the
WAL file before the call returns, so it survives the process dying (``kill -9``) the
next instant. A power loss or OS crash can lose the transactions committed since the
last WAL checkpoint (SQLite's documented trade-off for NORMAL in WAL mode).
"""

from __future__ import annotations

import functools
import json
import operator
import sqlite3
import time
from collections.abc import Callable, Collection
from typing import Any

from ..model import CANCELLED, FINISHED, PENDING, RUNNING, STARTING_PROGRESS, Job
from .base import JOB_COLUMNS, JSON_COLUMNS, Store, empty_counts, interrupt_job
from .sqlite_batch import BulkInsert, BulkUpdate, SQLiteThread

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    progress TEXT NOT NULL,
    result TEXT,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    completed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0,
    run_at REAL,
    timeout REAL,
    max_attempts INTEGER NOT NULL DEFAULT 1,
    idempotency_key TEXT UNIQUE,
    fingerprint TEXT,
    retry_of INTEGER,
    terminal_seq INTEGER,
    interruptions INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (priority DESC, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS jobs_delayed ON jobs (run_at)
    WHERE status = 'pending' AND run_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (completed_at, id)
    WHERE status IN ('completed', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

COLUMNS = JOB_COLUMNS
_FINISHED_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(FINISHED)) + ")"
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
_UPDATE = BulkUpdate("jobs", "id", COLUMNS[1:])
_RUNNABLE = ("FROM jobs INDEXED BY jobs_pending WHERE status = 'pending'"
             " AND (run_at IS NULL OR run_at <= ?) ORDER BY priority DESC, id LIMIT ?")
_CLAIM = ("UPDATE jobs SET status = 'running', started_at = ?, run_at = NULL,"
          f" attempts = attempts + 1, progress = ? WHERE id IN (SELECT id {_RUNNABLE})")
_NULLABLE = frozenset({"result", "error", "started_at", "completed_at", "run_at", "timeout",
                       "idempotency_key", "fingerprint", "retry_of", "terminal_seq"})
"""Columns without NOT NULL: an INSERT may leave them out to store NULL."""
_values = operator.attrgetter(*COLUMNS)
_JSON_AT = tuple(COLUMNS.index(name) for name in JSON_COLUMNS)
_STATUS_AT = COLUMNS.index("status")
_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_decode = json.JSONDecoder().decode
"""JSON columns as stored: compact. What reaches the store is a tree (params and
progress are built from JSON, results are checked by the queue)."""
_STARTING = _encode(STARTING_PROGRESS)


def _to_row(job: Job) -> list[Any]:
    """The job's column values, in ``COLUMNS`` order (id first), JSON encoded."""
    row = list(_values(job))
    for i in _JSON_AT:
        row[i] = _encode(row[i])
    return row


def _from_row(row: tuple[Any, ...]) -> Job:
    """A job from a row selected in ``COLUMNS`` order."""
    values = list(row)
    for i in _JSON_AT:
        if values[i] is not None:
            values[i] = _decode(values[i])
    return Job(*values)


class SQLiteStore(Store):
    """Jobs in one SQLite file at ``path``. See the module docstring for the
    threading and durability model. Raises sqlite3.Error on I/O failures."""

    durable = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._thread = SQLiteThread(self._connect, _checkpoint, "rawjobs-sqlite")
        # ``next_run_at`` without a round trip: this process makes every write, so
        # once a query found no delayed job, none exists until a write may add one.
        self._none_delayed = False
        self._delaying_writes = 0

    # -- the thread -------------------------------------------------------------

    async def open(self) -> None:
        await self._thread.start()

    async def close(self) -> None:
        await self._thread.stop()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               cached_statements=256)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return self._thread.call(fn)

    # -- the interface ------------------------------------------------------------

    async def add(self, job: Job) -> tuple[Job, bool]:
        row = _to_row(job)[1:]
        insert, pick = _insert_for(tuple(value is None for value in row))
        values = pick(row)
        key = job.idempotency_key
        self._note_write(job)

        def op(conn: sqlite3.Connection) -> tuple[Job, bool] | int:
            found = conn.execute(f"{_SELECT} WHERE idempotency_key = ?", (key,)).fetchone()
            if found is not None:
                return _from_row(found), False
            return insert.run(conn, [values])[0]

        done = await (self._thread.bulk(insert, values) if key is None else self._call(op))
        if isinstance(done, tuple):
            return done
        stored = job.copy()
        stored.id = done
        return stored, True

    async def get(self, job_id: int) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return _from_row(row) if row else None

        return await self._call(op)

    async def list(self, status=None, type_=None, limit=100, before=None) -> list[Job]:
        where, args = [], []
        for clause, value in (("status = ?", status), ("type = ?", type_), ("id < ?", before)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = _SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)

        def op(conn: sqlite3.Connection) -> list[Job]:
            return [_from_row(r) for r in conn.execute(sql, args)]

        return await self._call(op)

    async def claim(self, now: float) -> Job | None:
        jobs = await self.claim_many(now, 1)
        return jobs[0] if jobs else None

    async def claim_many(self, now: float, limit: int) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} {_RUNNABLE}",
                                (now, limit)).fetchall()
            if rows:  # the same selection, in the same transaction: the same rows
                conn.execute(_CLAIM, (now, _STARTING, now, limit))
            return rows

        jobs = [_from_row(row) for row in await self._call(op)]
        for job in jobs:  # as the UPDATE above wrote them
            job.status, job.started_at, job.run_at = RUNNING, now, None
            job.attempts += 1
            job.progress = dict(STARTING_PROGRESS)
        return jobs

    async def next_run_at(self) -> float | None:
        if self._none_delayed:
            return None

        def op(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(run_at) FROM jobs INDEXED BY jobs_delayed"
                " WHERE status = 'pending' AND run_at IS NOT NULL"
            ).fetchone()
            return row[0]

        writes = self._delaying_writes
        run_at = await self._call(op)
        # Calls run in the order they are made: a write made before this query is
        # in its answer; one made since may have added a delayed job.
        if run_at is None and writes == self._delaying_writes:
            self._none_delayed = True
        return run_at

    def _note_write(self, job: Job) -> None:
        """Called as a write of ``job`` is made: forget "no delayed job" if it may
        leave one (pending with a ``run_at``)."""
        if job.run_at is not None and job.status == PENDING:
            self._delaying_writes += 1
            self._none_delayed = False

    async def save(self, job: Job, changed: Collection[str] | None = None) -> None:
        # The statement's parameters are the job as it is now, whatever happens to it next.
        if changed is None:
            op, args = _UPDATE, _update_args(job)
        else:
            op, args = _partial_update(tuple(changed), job)
        self._note_write(job)
        await self._thread.bulk(op, args)

    async def finish(self, job: Job) -> bool:
        args = _update_args(job)
        self._note_write(job)

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (args[-1],)).fetchone()
            if row is None or row[0] != RUNNING:
                return False
            conn.execute(_UPDATE.single, args)
            return True

        return await self._call(op)

    async def cancel_running(self, job_id: int, now: float) -> Job | None:
        def op(conn: sqlite3.Connection) -> Job | None:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[_STATUS_AT] != RUNNING:
                return None
            job = _from_row(row)
            job.status, job.completed_at = CANCELLED, now
            _write(conn, job)
            return job

        return await self._call(op)

    async def save_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        text = _encode(progress)
        await self._call(lambda conn: conn.execute(
            "UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'", (text, job_id)
        ))

    async def cancel_pending(self, job_id: int, now: float) -> tuple[Job | None, bool]:
        def op(conn: sqlite3.Connection) -> tuple[Job | None, bool]:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None, False
            job = _from_row(row)
            if job.status != PENDING:
                return job, False
            job.status, job.completed_at = CANCELLED, now
            _write(conn, job)
            return job, True

        return await self._call(op)

    async def clear_finished(self) -> list[tuple[int, str]]:
        return await self._call(lambda conn: _delete_counted(
            conn, f"SELECT id, status FROM jobs WHERE status IN {_FINISHED_SQL}", ()
        ))

    async def prune_finished(self, count: int) -> list[tuple[int, str]]:
        return await self._call(lambda conn: _delete_counted(
            conn,
            f"SELECT id, status FROM jobs WHERE status IN {_FINISHED_SQL}"
            " ORDER BY completed_at, id LIMIT ?",
            (count,),
        ))

    async def stats(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            counts = empty_counts()
            for status, n in conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
                counts[status] = n
            return counts

        return await self._call(op)

    async def recover(self, max_interruptions: int) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            jobs = [_from_row(r) for r in conn.execute(
                f"{_SELECT} WHERE status = 'running' ORDER BY id")]
            now = time.time()
            for job in jobs:
                interrupt_job(job, max_interruptions, now)
                _write(conn, job)
            return jobs

        return await self._call(op)

    async def reserve_seq(self, count: int, at_least: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
            first = max(row[0] if row else 1, at_least)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('seq', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (first + count,),
            )
            return first

        return await self._call(op)


def _update_args(job: Job) -> list[Any]:
    """The parameters of ``_UPDATE`` for ``job``: every column, then the id."""
    row = _to_row(job)
    row.append(row[0])
    del row[0]
    return row


@functools.lru_cache(maxsize=64)
def _partial_statement(names: tuple[str, ...]) -> tuple[BulkUpdate, Callable[[Job], Any],
                                                      tuple[int, ...]]:
    """For an UPDATE of ``names``: the operation, a getter of the values (then the
    id), the positions of the JSON ones."""
    unknown = set(names) - set(COLUMNS[1:])
    if unknown:
        raise ValueError(f"not job columns: {sorted(unknown)}")
    getter = operator.attrgetter(*names, "id")
    json_at = tuple(i for i, name in enumerate(names) if name in JSON_COLUMNS)
    return BulkUpdate("jobs", "id", names), getter, json_at


def _partial_update(names: tuple[str, ...], job: Job) -> tuple[BulkUpdate, list[Any]]:
    """The UPDATE of the fields ``names`` of ``job``, and its parameters."""
    op, getter, json_at = _partial_statement(names)
    args = list(getter(job))
    for i in json_at:
        args[i] = _encode(args[i])
    return op, args


@functools.lru_cache(maxsize=64)
def _insert_for(nones: tuple[bool, ...]) -> tuple[BulkInsert, Callable[[Any], Any]]:
    """The INSERT for a row whose values are None where ``nones`` says (in
    ``COLUMNS[1:]`` order), and a getter of the values it binds: a nullable column
    that is None is left out (binding None costs sqlite3 an adaptation lookup)."""
    kept = [i for i, (name, none) in enumerate(zip(COLUMNS[1:], nones, strict=True))
            if not (none and name in _NULLABLE)]
    return (BulkInsert("jobs", "id", [COLUMNS[1 + i] for i in kept]),
            operator.itemgetter(*kept))


def _write(conn: sqlite3.Connection, job: Job) -> None:
    conn.execute(_UPDATE.single, _update_args(job))


def _checkpoint(conn: sqlite3.Connection) -> None:
    """At close: move the WAL into the database file and truncate it."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _delete_counted(
    conn: sqlite3.Connection, select: str, args: tuple[Any, ...]
) -> list[tuple[int, str]]:
    rows = [(r[0], r[1]) for r in conn.execute(select, args)]
    conn.executemany("DELETE FROM jobs WHERE id = ?", [(r[0],) for r in rows])
    return rows
