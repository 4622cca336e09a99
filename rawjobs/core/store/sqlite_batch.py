"""The SQLite store's thread: group commit, with one statement for many calls.

One thread owns the connection, so the event loop never waits on SQLite. The thread
takes every call queued and runs them in one transaction (group commit), then
resolves their futures on the event loop: under load one commit serves many jobs.

A call is a function of the connection, or an item of a *bulk* operation (insert
this row; update this row): consecutive items of one bulk operation run as one
statement (a multi-row ``INSERT``, an ``UPDATE ... FROM (VALUES ...)``). A batch then
costs a few statements instead of one per call: fewer trips through SQLite's
statement machinery, and fewer times this thread gives up the GIL and waits to get
it back (``sqlite3`` releases it around every step of every statement).

Each call stays all or nothing: the batch runs straight through, and if anything in
it raises, the transaction is rolled back and the batch runs again one call at a
time, each in its own savepoint, so a failing call gets its exception and the others
are committed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger("rawjobs.store")
T = TypeVar("T")
BATCH = 1024
"""Calls taken into one transaction at most."""
MAX_ROWS = 256
"""Rows in one bulk statement at most (fewer if SQLite allows fewer parameters)."""
UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
"""``UPDATE ... FROM`` exists (SQLite 3.33); else bulk updates use executemany."""


class BulkOp:
    """An operation whose items, queued one by one, run together: ``run(conn,
    items)`` returns one result per item, in order, or raises."""

    def run(self, conn: sqlite3.Connection, items: list[Any]) -> list[Any]:
        raise NotImplementedError


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    """``items`` cut into power-of-two lengths up to ``size``: a few distinct
    statement texts, so SQLite's statement cache keeps them prepared."""
    out, start = [], 0
    while start < len(items):
        n = min(size, len(items) - start)
        n = 1 << (n.bit_length() - 1)
        out.append(items[start:start + n])
        start += n
    return out


def _rows_per_statement(conn: sqlite3.Connection, columns: int) -> int:
    limit = conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return max(1, min(MAX_ROWS, limit // columns))


class BulkInsert(BulkOp):
    """Insert rows (every column but the ``INTEGER PRIMARY KEY AUTOINCREMENT`` one);
    each item is a row of values in ``columns`` order, each result the new id."""

    def __init__(self, table: str, key: str, columns: Sequence[str]) -> None:
        self.table, self.key, self.columns = table, key, tuple(columns)
        self._one = "(" + ", ".join("?" * len(self.columns)) + ")"

    @functools.lru_cache(maxsize=16)  # noqa: B019 - a handful of instances, kept for good
    def _sql(self, rows: int) -> str:
        return (f"INSERT INTO {self.table} ({', '.join(self.columns)}) VALUES "
                + ", ".join([self._one] * rows))

    def run(self, conn: sqlite3.Connection, items: list[Any]) -> list[int]:
        ids: list[int] = []
        for chunk in _chunks(items, _rows_per_statement(conn, len(self.columns))):
            last = conn.execute(self._sql(len(chunk)), [v for row in chunk for v in row]).lastrowid
            first = last - len(chunk) + 1
            # AUTOINCREMENT gives each row an id above every id before, in the order of
            # the VALUES: n rows all within the last n ids means ids first..last in order.
            count = conn.execute(f"SELECT count(*) FROM {self.table} WHERE {self.key}"
                                 " BETWEEN ? AND ?", (first, last)).fetchone()[0]
            if count != len(chunk):
                raise RuntimeError("multi-row INSERT did not take consecutive ids")
            ids.extend(range(first, last + 1))
        return ids


class BulkUpdate(BulkOp):
    """Update rows by key: ``SET column = ?, ...`` for ``columns``; each item is the
    values in ``columns`` order followed by the key; each result None."""

    def __init__(self, table: str, key: str, columns: Sequence[str]) -> None:
        self.table, self.key, self.columns = table, key, tuple(columns)
        self.single = (f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in self.columns)}"
                       f" WHERE {key} = ?")
        self._one = "(" + ", ".join("?" * (len(self.columns) + 1)) + ")"

    @functools.lru_cache(maxsize=16)  # noqa: B019 - a handful of instances, kept for good
    def _sql(self, rows: int) -> str:
        n = len(self.columns)
        assignments = ", ".join(f"{c} = v.column{i + 1}" for i, c in enumerate(self.columns))
        return (f"UPDATE {self.table} SET {assignments} FROM (VALUES "
                + ", ".join([self._one] * rows)
                + f") AS v WHERE {self.table}.{self.key} = v.column{n + 1}")

    def run(self, conn: sqlite3.Connection, items: list[Any]) -> list[None]:
        keys = [item[-1] for item in items]
        if len(items) == 1 or not UPDATE_FROM or len(set(keys)) != len(keys):
            # One row, an old SQLite, or a row updated twice (the join would pick
            # one update arbitrarily): one statement per item, in order.
            conn.executemany(self.single, items)
        else:
            for chunk in _chunks(items, _rows_per_statement(conn, len(self.columns) + 1)):
                conn.execute(self._sql(len(chunk)), [v for item in chunk for v in item])
        return [None] * len(items)


Call = tuple[Any, BulkOp | None, asyncio.Future[Any]]
"""``(fn, None, future)``: run ``fn(conn)``; ``(item, bulk, future)``: an item of
``bulk``."""


class SQLiteThread:
    """The thread that owns the connection ``connect()`` opens; ``finish(conn)`` runs
    on it before it is closed."""

    def __init__(self, connect: Callable[[], sqlite3.Connection],
                 finish: Callable[[sqlite3.Connection], None], name: str) -> None:
        self._connect = connect
        self._finish = finish
        self._name = name
        self._calls: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Start the thread and open the connection (its errors are raised here)."""
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name=self._name,
                                        daemon=True)
        self._thread.start()
        await ready

    async def stop(self) -> None:
        """Run every call queued so far, close the connection, end the thread."""
        if self._thread is None:
            return
        self._calls.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn(conn)``; the future gets its result or exception."""
        return self._queue(fn, None)

    def bulk(self, op: BulkOp, item: Any) -> asyncio.Future[Any]:
        """Queue one item of ``op``; the future gets that item's result."""
        return self._queue(item, op)

    def _queue(self, what: Any, op: BulkOp | None) -> asyncio.Future[Any]:
        if self._thread is None or self._loop is None:
            raise RuntimeError("SQLiteStore is not open")
        future = self._loop.create_future()
        self._calls.put((what, op, future))
        return future

    # -- on the thread ----------------------------------------------------------------

    def _serve(self, ready: asyncio.Future[None]) -> None:
        assert self._loop is not None
        try:
            conn = self._connect()
        except Exception as exc:  # reported to start()'s caller
            self._loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        self._loop.call_soon_threadsafe(_settle, ready, None, None)
        try:
            while self._run_batch(conn):
                pass
        finally:
            self._finish(conn)
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection) -> bool:
        """Run the calls waiting (at least one); False once asked to stop."""
        batch = [self._calls.get()]
        while len(batch) < BATCH:
            try:
                batch.append(self._calls.get_nowait())
            except queue.Empty:
                break
        calls = [c for c in batch if c is not None]
        results = _execute(conn, calls)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle_all, results)
        return len(calls) == len(batch)


def _execute(conn: sqlite3.Connection, calls: list[Call]) -> list[Any]:
    """Run ``calls`` in one transaction: ``[(future, result, exception)]``."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = _run_straight(conn, calls)
        except Exception:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            results = _run_each_in_savepoint(conn, calls)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        log.exception("SQLite transaction failed")
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        results = [(future, None, exc) for _, _, future in calls]
    return results


def _run_straight(conn: sqlite3.Connection, calls: list[Call]) -> list[Any]:
    """Every call, consecutive items of one bulk operation together; raises if any
    call does."""
    results: list[Any] = []
    i, n = 0, len(calls)
    while i < n:
        what, op, future = calls[i]
        if op is None:
            results.append((future, what(conn), None))
            i += 1
            continue
        j = i + 1
        while j < n and calls[j][1] is op:
            j += 1
        group = calls[i:j]
        outs = op.run(conn, [c[0] for c in group])
        results.extend((c[2], out, None) for c, out in zip(group, outs, strict=True))
        i = j
    return results


def _run_each_in_savepoint(conn: sqlite3.Connection, calls: list[Call]) -> list[Any]:
    """Every call in its own savepoint: one that raises leaves nothing written and
    gets its exception; the others are unaffected."""
    results = []
    for what, op, future in calls:
        conn.execute("SAVEPOINT op")
        try:
            result = what(conn) if op is None else op.run(conn, [what])[0]
            conn.execute("RELEASE op")
            results.append((future, result, None))
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            results.append((future, None, exc))
    return results


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _settle_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, exc in results:
        _settle(future, result, exc)
