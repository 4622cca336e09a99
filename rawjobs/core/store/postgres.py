"""PostgreSQL store (``--db postgresql://...``): one queue shared by several nodes.

Claiming uses ``SELECT ... FOR UPDATE SKIP LOCKED`` in priority/FIFO order, so no
job runs on two live nodes at once. A running job holds a lease (``lease_until``,
database clock) renewed by its node's heartbeat; a job whose lease expired is put
back to pending by whichever node reaps first (at-least-once execution). Events
cross nodes with LISTEN/NOTIFY (see rawjobs.core.cluster).

Requires asyncpg (the ``rawjobs[postgres]`` extra). Times are Unix seconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from typing import Any

from ..model import FAILED, FINISHED, PENDING, QUEUED_PROGRESS, STARTING_PROGRESS, Job
from .base import JOB_COLUMNS, JSON_COLUMNS, SharedStore, empty_counts

try:
    import asyncpg
except ImportError:  # pragma: no cover - reported when the store is opened
    asyncpg = None

log = logging.getLogger("rawjobs.store")

CHANNEL = "rawjobs_events"
_NOW = "extract(epoch from clock_timestamp())"
_FINISHED_SQL = "(" + ", ".join(f"'{s}'" for s in sorted(FINISHED)) + ")"

MIGRATIONS: list[str] = [
    # 1: jobs, sequence numbers, nodes
    """
    CREATE TABLE rawjobs_jobs (
        id BIGSERIAL PRIMARY KEY,
        type TEXT NOT NULL,
        params JSON NOT NULL,
        status TEXT NOT NULL,
        progress JSON NOT NULL,
        result JSON,
        error TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        completed_at DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        priority INTEGER NOT NULL DEFAULT 0,
        run_at DOUBLE PRECISION,
        timeout DOUBLE PRECISION,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        idempotency_key TEXT UNIQUE,
        fingerprint TEXT,
        retry_of BIGINT,
        terminal_seq BIGINT,
        interruptions INTEGER NOT NULL DEFAULT 0,
        node_id TEXT,
        lease_until DOUBLE PRECISION
    );
    CREATE INDEX rawjobs_jobs_pending ON rawjobs_jobs (priority DESC, id)
        WHERE status = 'pending';
    CREATE INDEX rawjobs_jobs_finished ON rawjobs_jobs (completed_at, id)
        WHERE status IN ('completed', 'failed', 'cancelled');
    CREATE INDEX rawjobs_jobs_leases ON rawjobs_jobs (lease_until) WHERE status = 'running';
    CREATE INDEX rawjobs_jobs_status ON rawjobs_jobs (status, id);
    CREATE TABLE rawjobs_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    INSERT INTO rawjobs_meta (key, value) VALUES ('seq', 1);
    CREATE TABLE rawjobs_nodes (
        id TEXT PRIMARY KEY,
        capacity INTEGER NOT NULL,
        active INTEGER NOT NULL,
        processed BIGINT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL
    );
    """,
]

COLUMNS = JOB_COLUMNS
_WRITABLE = COLUMNS[1:]
_SET_ALL = ", ".join(f"{c} = ${i + 2}" for i, c in enumerate(_WRITABLE))


def _args(job: Job) -> list[Any]:
    return [json.dumps(getattr(job, c)) if c in JSON_COLUMNS else getattr(job, c) for c in _WRITABLE]


def _job(row: Any) -> Job:
    fields = {c: row[c] for c in COLUMNS}
    for c in JSON_COLUMNS:
        fields[c] = json.loads(fields[c]) if fields[c] is not None else None
    return Job(**fields)


class PostgresStore(SharedStore):
    """Jobs in PostgreSQL, shared by every node using the same database.

    ``node_id`` names this node in leases and the nodes table; ``lease_seconds`` is
    how long a claim stays valid without a heartbeat. Raises asyncpg errors on
    database failures."""

    durable = True

    def __init__(self, dsn: str, node_id: str, lease_seconds: float = 15.0) -> None:
        self.dsn = dsn
        self.node_id = node_id
        self.lease_seconds = lease_seconds
        self.pool: Any = None

    # -- life cycle ---------------------------------------------------------------

    async def open(self) -> None:
        if self.pool is not None:
            return
        if asyncpg is None:
            raise RuntimeError("PostgreSQL needs asyncpg: pip install 'rawjobs[postgres]'")
        self.pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=10)
        await self.migrate()

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def migrate(self) -> int:
        """Apply the migrations not yet applied, under an advisory lock so that
        nodes starting at once apply each exactly once. Returns the schema version."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(7170011)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS rawjobs_migrations"
                " (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
            done = {r["version"] for r in await conn.fetch("SELECT version FROM rawjobs_migrations")}
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version not in done:
                    await conn.execute(sql)
                    await conn.execute(
                        f"INSERT INTO rawjobs_migrations VALUES ($1, {_NOW})", version)
                    log.info("applied schema migration %d", version)
        return len(MIGRATIONS)

    # -- the interface ------------------------------------------------------------

    async def add(self, job: Job) -> tuple[Job, bool]:
        cols = ", ".join(_WRITABLE)
        marks = ", ".join(f"${i + 1}" for i in range(len(_WRITABLE)))
        row = await self.pool.fetchrow(
            f"INSERT INTO rawjobs_jobs ({cols}) VALUES ({marks})"
            " ON CONFLICT (idempotency_key) DO NOTHING RETURNING *", *_args(job))
        if row is not None:
            return _job(row), True
        row = await self.pool.fetchrow(
            "SELECT * FROM rawjobs_jobs WHERE idempotency_key = $1", job.idempotency_key)
        if row is None:  # the other job went away in between: try once more
            return await self.add(job)
        return _job(row), False

    async def get(self, job_id: int) -> Job | None:
        row = await self.pool.fetchrow("SELECT * FROM rawjobs_jobs WHERE id = $1", job_id)
        return _job(row) if row else None

    async def list(self, status=None, type_=None, limit=100, before=None) -> list[Job]:
        where, args = [], []
        for clause, value in (("status", status), ("type", type_), ("id <", before)):
            if value is not None:
                args.append(value)
                op = "" if "<" in clause else " ="
                where.append(f"{clause}{op} ${len(args)}")
        sql = "SELECT * FROM rawjobs_jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        args.append(limit)
        rows = await self.pool.fetch(sql + f" ORDER BY id DESC LIMIT ${len(args)}", *args)
        return [_job(r) for r in rows]

    async def claim(self, now: float) -> Job | None:
        jobs = await self.claim_many(now, 1)
        return jobs[0] if jobs else None

    async def claim_many(self, now: float, limit: int) -> list[Job]:
        rows = await self.pool.fetch(
            "UPDATE rawjobs_jobs SET status = 'running', attempts = attempts + 1,"
            " started_at = $1, run_at = NULL, progress = $2, node_id = $3,"
            f" lease_until = {_NOW} + $4"
            " WHERE id IN (SELECT id FROM rawjobs_jobs WHERE status = 'pending'"
            "   AND (run_at IS NULL OR run_at <= $1) ORDER BY priority DESC, id"
            "   LIMIT $5 FOR UPDATE SKIP LOCKED)"
            " RETURNING *",
            now, json.dumps(STARTING_PROGRESS), self.node_id, self.lease_seconds, limit)
        return sorted((_job(r) for r in rows), key=lambda job: (-job.priority, job.id))

    async def next_run_at(self) -> float | None:
        return await self.pool.fetchval(
            "SELECT MIN(run_at) FROM rawjobs_jobs WHERE status = 'pending' AND run_at IS NOT NULL")

    async def save(self, job: Job, changed: Collection[str] | None = None) -> None:
        await self.pool.execute(f"UPDATE rawjobs_jobs SET {_SET_ALL} WHERE id = $1",
                                job.id, *_args(job))

    async def finish(self, job: Job) -> bool:
        """Write the transition of a job this node runs (completed, failed, waiting
        for a retry, back to pending at shutdown). False, and nothing written, when
        the job is no longer running here: cancelled elsewhere, or its lease lost."""
        done = await self.pool.fetchval(
            f"UPDATE rawjobs_jobs SET {_SET_ALL}, node_id = NULL, lease_until = NULL"
            f" WHERE id = $1 AND status = 'running' AND node_id = ${len(_WRITABLE) + 2}"
            " RETURNING id",
            job.id, *_args(job), self.node_id)
        return done is not None

    async def save_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        await self.pool.execute(
            "UPDATE rawjobs_jobs SET progress = $2 WHERE id = $1 AND status = 'running'"
            " AND node_id = $3", job_id, json.dumps(progress), self.node_id)

    async def cancel_pending(self, job_id: int, now: float) -> tuple[Job | None, bool]:
        row = await self.pool.fetchrow(
            "UPDATE rawjobs_jobs SET status = 'cancelled', completed_at = $2"
            " WHERE id = $1 AND status = 'pending' RETURNING *", job_id, now)
        if row is not None:
            return _job(row), True
        job = await self.get(job_id)
        return job, False

    async def cancel_running(self, job_id: int, now: float) -> Job | None:
        """Cancel a job running on any node; its node stops it when the
        ``job_cancelled`` event reaches it. None if it is not running."""
        row = await self.pool.fetchrow(
            "UPDATE rawjobs_jobs SET status = 'cancelled', completed_at = $2,"
            " node_id = NULL, lease_until = NULL"
            " WHERE id = $1 AND status = 'running' RETURNING *", job_id, now)
        return _job(row) if row else None

    async def clear_finished(self) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(
            f"DELETE FROM rawjobs_jobs WHERE status IN {_FINISHED_SQL} RETURNING id, status")
        return [(r["id"], r["status"]) for r in rows]

    async def prune_finished(self, count: int) -> list[tuple[int, str]]:
        rows = await self.pool.fetch(
            "DELETE FROM rawjobs_jobs WHERE id IN (SELECT id FROM rawjobs_jobs"
            f" WHERE status IN {_FINISHED_SQL} ORDER BY completed_at, id LIMIT $1"
            " FOR UPDATE SKIP LOCKED) RETURNING id, status", count)
        return [(r["id"], r["status"]) for r in rows]

    async def finished_count(self) -> int:
        return await self.pool.fetchval(
            f"SELECT COUNT(*) FROM rawjobs_jobs WHERE status IN {_FINISHED_SQL}")

    async def stats(self) -> dict[str, int]:
        counts = empty_counts()
        for row in await self.pool.fetch(
                "SELECT status, COUNT(*) AS n FROM rawjobs_jobs GROUP BY status"):
            counts[row["status"]] = row["n"]
        return counts

    async def recover(self, max_interruptions: int) -> list[Job]:
        """Several nodes share the queue, so only jobs whose lease has expired are
        taken back (see ``reap``); a live node's running jobs are left alone."""
        return await self.reap(max_interruptions)

    async def reap(self, max_interruptions: int) -> list[Job]:
        """Running jobs whose lease expired (their node died or lost the database)
        go back to pending with ``interruptions`` + 1, or fail with "interrupted" at
        ``max_interruptions``. Returns the jobs changed."""
        rows = await self.pool.fetch(
            "UPDATE rawjobs_jobs SET interruptions = interruptions + 1,"
            f" status = CASE WHEN interruptions + 1 >= $1 THEN '{FAILED}' ELSE '{PENDING}' END,"
            " error = CASE WHEN interruptions + 1 >= $1 THEN 'interrupted' ELSE error END,"
            f" completed_at = CASE WHEN interruptions + 1 >= $1 THEN {_NOW} END,"
            " progress = CASE WHEN interruptions + 1 >= $1 THEN progress ELSE $2::json END,"
            " node_id = NULL, lease_until = NULL"
            " WHERE id IN (SELECT id FROM rawjobs_jobs WHERE status = 'running'"
            f"   AND lease_until < {_NOW} FOR UPDATE SKIP LOCKED)"
            " RETURNING *", max_interruptions, json.dumps(QUEUED_PROGRESS))
        return [_job(r) for r in rows]

    async def reserve_seq(self, count: int, at_least: int) -> int:
        return await self.pool.fetchval(
            "UPDATE rawjobs_meta SET value = GREATEST(value, $2) + $1 WHERE key = 'seq'"
            " RETURNING value - $1", count, at_least)

    # -- several nodes -------------------------------------------------------------

    async def heartbeat(self, stats: dict[str, Any], running: list[int]) -> set[int]:
        """Record this node as alive with its worker ``stats`` (active, capacity,
        processed) and renew the leases of its ``running`` jobs. Returns the ids of
        those it still holds; the others were taken away (lease lost or cancelled)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO rawjobs_nodes (id, capacity, active, processed, started_at,"
                f" last_seen) VALUES ($1, $2, $3, $4, {_NOW}, {_NOW})"
                " ON CONFLICT (id) DO UPDATE SET capacity = $2, active = $3, processed = $4,"
                f" last_seen = {_NOW}",
                self.node_id, stats["capacity"], stats["active"], stats["processed"])
            rows = await conn.fetch(
                f"UPDATE rawjobs_jobs SET lease_until = {_NOW} + $2"
                " WHERE id = ANY($1::bigint[]) AND status = 'running' AND node_id = $3"
                " RETURNING id", running, self.lease_seconds, self.node_id)
        return {r["id"] for r in rows}

    async def nodes(self, max_age: float) -> list[dict[str, Any]]:
        """Nodes seen in the last ``max_age`` seconds: ``[{id, active, capacity,
        processed, last_seen}]``, by id."""
        rows = await self.pool.fetch(
            "SELECT id, active, capacity, processed, last_seen FROM rawjobs_nodes"
            f" WHERE last_seen >= {_NOW} - $1 ORDER BY id", max_age)
        return [dict(r) for r in rows]

    async def forget_node(self) -> None:
        await self.pool.execute("DELETE FROM rawjobs_nodes WHERE id = $1", self.node_id)

    async def notify(self, payloads: list[str]) -> None:
        """Send ``payloads`` (each at most 7,999 bytes), in order, to every listening
        node, in one round trip and one transaction."""
        await self.pool.execute(
            "SELECT pg_notify($1, payload) FROM unnest($2::text[]) WITH ORDINALITY"
            " AS p(payload, n) ORDER BY n", CHANNEL, payloads)

    async def listen(self, callback: Callable[[str], None]) -> Any:
        """Open a dedicated connection listening on the events channel; returns it
        (close it to stop). ``callback(payload)`` runs for each notification."""
        conn = await asyncpg.connect(self.dsn)
        await conn.add_listener(CHANNEL, lambda _c, _pid, _ch, payload: callback(payload))
        return conn

