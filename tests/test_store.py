"""The store contract (issue 3): every backend implements rawjobs.core.store.base.Store
in full and behaves the same way.

Runs in process against each backend in ``BACKENDS``. To test another backend, add
one line there: a name and a factory ``(request, tmp_path) -> Store`` that builds an
unopened store (``request`` is pytest's, for fixtures such as ``pg_dsn``). Calling the
factory again within a test must give a store over the same data: that is how
durable backends are reopened.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rawjobs.core.model import (
    CANCELLED,
    COMPLETED,
    FAILED,
    FINISHED,
    PENDING,
    QUEUED_PROGRESS,
    RUNNING,
    STARTING_PROGRESS,
    STATUSES,
    Job,
)
from rawjobs.core.store.base import Store
from rawjobs.core.store.memory import MemoryStore
from rawjobs.core.store.postgres import PostgresStore
from rawjobs.core.store.sqlite import SQLiteStore

StoreFactory = Callable[[pytest.FixtureRequest, Path], Store]

BACKENDS: dict[str, StoreFactory] = {
    "memory": lambda request, tmp_path: MemoryStore(),
    "sqlite": lambda request, tmp_path: SQLiteStore(str(tmp_path / "s.db")),
    "postgres": lambda request, tmp_path: PostgresStore(request.getfixturevalue("pg_dsn"), "n1"),
}
# What each backend is, known without building one: tests that only make sense for
# durable stores, or for single-node ones, are generated for those alone (no skips).
DURABLE = {"memory": False, "sqlite": True, "postgres": True}
SHARED = {"memory": False, "sqlite": False, "postgres": True}

NOW = 1_764_446_400.0


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    names = list(BACKENDS)
    if "reopen" in metafunc.fixturenames:
        names = [n for n in names if DURABLE[n]]
    if "single_node" in metafunc.fixturenames:
        names = [n for n in names if not SHARED[n]]
    metafunc.parametrize("backend", names)


@pytest.fixture
def make_store(request, tmp_path, backend) -> StoreFactory:
    """The factory of the backend under test, bound to this test's directory."""
    factory = BACKENDS[backend]
    return lambda: factory(request, tmp_path)


@pytest.fixture
async def store(make_store):
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def reopen(store, make_store):
    """``await reopen()`` closes the store and opens a new one over the same data
    (only durable backends get tests that use it)."""
    opened: list[Store] = [store]

    async def _reopen() -> Store:
        await opened[-1].close()
        fresh = make_store()
        await fresh.open()
        opened.append(fresh)
        return fresh

    yield _reopen
    for s in opened[1:]:
        await s.close()


def new_job(type_: str = "echo", **fields) -> Job:
    params = fields.pop("params", {"message": "hi", "delay": 1})
    return Job(id=0, type=type_, params=params, created_at=fields.pop("created_at", NOW),
               **fields)


async def add(store: Store, type_: str = "echo", **fields) -> Job:
    job, created = await store.add(new_job(type_, **fields))
    assert created
    return job


async def finish(store: Store, job: Job, status: str = COMPLETED, at: float = NOW + 10,
                 **fields) -> Job:
    """Mark ``job`` finished the way the queue does (claim not required for the store)."""
    job = job.copy()
    job.status = status
    job.completed_at = at
    for name, value in fields.items():
        setattr(job, name, value)
    await store.save(job)
    return job


async def ids(store: Store, **query) -> list[int]:
    return [j.id for j in await store.list(**query)]


# -- open / close -----------------------------------------------------------------------


async def test_open_and_close_are_idempotent(make_store):
    s = make_store()
    await s.open()
    await s.open()
    job = await add(s)
    assert (await s.get(job.id)) is not None
    await s.close()
    await s.close()


# -- add ---------------------------------------------------------------------------------


async def test_add_assigns_increasing_ids_from_1(store):
    jobs = [await add(store) for _ in range(5)]
    assert [j.id for j in jobs] == [1, 2, 3, 4, 5]


async def test_add_returns_the_stored_job(store):
    job, created = await store.add(new_job(
        "countdown", params={"seconds": 5}, priority=3, timeout=7.5, max_attempts=2,
        fingerprint="fp", retry_of=None,
    ))
    assert created
    assert job.id == 1
    assert job.type == "countdown"
    assert job.params == {"seconds": 5}
    assert job.status == PENDING
    assert job.progress == QUEUED_PROGRESS
    assert job.result is None and job.error is None
    assert job.created_at == NOW
    assert job.started_at is None and job.completed_at is None
    assert job.attempts == 0
    assert (job.priority, job.timeout, job.max_attempts) == (3, 7.5, 2)
    stored = await store.get(job.id)
    assert stored == job


async def test_add_does_not_keep_the_callers_object(store):
    template = new_job()
    first, _ = await store.add(template)
    second, _ = await store.add(template)
    assert (first.id, second.id) == (1, 2)
    assert template.id == 0


async def test_concurrent_adds_get_distinct_ids(store):
    results = await asyncio.gather(*(store.add(new_job()) for _ in range(200)))
    got = sorted(job.id for job, created in results)
    assert all(created for _, created in results)
    assert got == list(range(1, 201))
    assert (await store.stats())[PENDING] == 200


async def test_concurrent_adds_each_get_the_id_of_their_own_job(store):
    results = await asyncio.gather(*(
        store.add(new_job(params={"message": f"m{i}", "delay": 1 + i % 30}))
        for i in range(300)))
    for i, (job, _) in enumerate(results):
        assert job.params == {"message": f"m{i}", "delay": 1 + i % 30}
        assert (await store.get(job.id)).params == job.params


async def test_ids_are_not_reused_after_clear_finished(store):
    jobs = [await add(store) for _ in range(3)]
    for job in jobs:
        await finish(store, job)
    assert len(await store.clear_finished()) == 3
    assert (await add(store)).id == 4


async def test_ids_are_not_reused_after_prune(store):
    jobs = [await add(store) for _ in range(3)]
    for i, job in enumerate(jobs):
        await finish(store, job, at=NOW + i)
    assert len(await store.prune_finished(3)) == 3
    assert (await add(store)).id == 4


async def test_idempotency_key_returns_the_existing_job(store):
    first, created = await store.add(new_job(idempotency_key="k1", fingerprint="a"))
    assert created
    again, created = await store.add(new_job(
        "countdown", params={"seconds": 3}, idempotency_key="k1", fingerprint="b"))
    assert not created
    assert again.id == first.id
    assert again.type == "echo" and again.fingerprint == "a"
    other, created = await store.add(new_job(idempotency_key="k2"))
    assert created and other.id > first.id  # increasing; a gap is allowed
    assert (await store.stats())[PENDING] == 2


async def test_idempotency_key_is_free_again_once_its_job_is_deleted(store):
    first, _ = await store.add(new_job(idempotency_key="k"))
    await finish(store, first)
    await store.clear_finished()
    again, created = await store.add(new_job(idempotency_key="k"))
    assert created
    assert again.id > first.id


async def test_concurrent_adds_with_one_idempotency_key_store_one_job(store):
    results = await asyncio.gather(*(store.add(new_job(idempotency_key="same"))
                                     for _ in range(20)))
    assert sum(created for _, created in results) == 1
    assert {job.id for job, _ in results} == {1}
    assert (await store.stats())[PENDING] == 1


# -- get ---------------------------------------------------------------------------------


async def test_get_unknown_is_none(store):
    assert await store.get(1) is None
    await add(store)
    assert await store.get(2) is None


async def test_get_returns_a_copy(store):
    job = await add(store)
    got = await store.get(job.id)
    got.status = FAILED
    got.params["message"] = "changed"
    got.progress["message"] = "changed"
    again = await store.get(job.id)
    assert again.status == PENDING
    assert again.params == {"message": "hi", "delay": 1}
    assert again.progress == QUEUED_PROGRESS


# -- list --------------------------------------------------------------------------------


async def test_list_newest_first(store):
    for _ in range(5):
        await add(store)
    assert await ids(store) == [5, 4, 3, 2, 1]


async def test_list_empty(store):
    assert await store.list() == []


async def test_list_default_limit_is_100(store):
    await asyncio.gather(*(store.add(new_job()) for _ in range(120)))
    got = await ids(store)
    assert got == list(range(120, 20, -1))


async def test_list_limit_and_before(store):
    for _ in range(10):
        await add(store)
    assert await ids(store, limit=3) == [10, 9, 8]
    assert await ids(store, limit=3, before=8) == [7, 6, 5]
    assert await ids(store, limit=100, before=3) == [2, 1]
    assert await ids(store, before=1) == []
    assert await ids(store, before=1000, limit=2) == [10, 9]


async def test_list_filters_by_status_and_type(store):
    a = await add(store, "echo")
    b = await add(store, "countdown", params={"seconds": 1})
    c = await add(store, "echo")
    d = await add(store, "countdown", params={"seconds": 1})
    await add(store, "echo")
    await finish(store, a)
    await finish(store, d, FAILED, error="boom")
    await store.cancel_pending(c.id, NOW)
    assert await ids(store, status=PENDING) == [5, b.id]
    assert await ids(store, status=COMPLETED) == [a.id]
    assert await ids(store, status=FAILED) == [d.id]
    assert await ids(store, status=CANCELLED) == [c.id]
    assert await ids(store, status=RUNNING) == []
    assert await ids(store, type_="countdown") == [d.id, b.id]
    assert await ids(store, type_="echo") == [5, c.id, a.id]
    assert await ids(store, type_="nope") == []
    assert await ids(store, status=PENDING, type_="echo") == [5]
    assert await ids(store, type_="echo", before=5, limit=1) == [c.id]


async def test_list_pages_walk_every_job_once(store):
    await asyncio.gather(*(store.add(new_job()) for _ in range(57)))
    seen: list[int] = []
    before = None
    while True:
        page = await ids(store, limit=10, before=before)
        if not page:
            break
        seen.extend(page)
        before = page[-1]
    assert seen == list(range(57, 0, -1))


# -- claim -------------------------------------------------------------------------------


async def test_claim_empty_is_none(store):
    assert await store.claim(NOW) is None


async def test_claim_marks_the_job_running(store):
    job = await add(store)
    claimed = await store.claim(NOW + 5)
    assert claimed.id == job.id
    assert claimed.status == RUNNING
    assert claimed.attempts == 1
    assert claimed.started_at == NOW + 5
    assert claimed.run_at is None
    assert claimed.progress == STARTING_PROGRESS
    stored = await store.get(job.id)
    assert (stored.status, stored.attempts, stored.started_at) == (RUNNING, 1, NOW + 5)
    assert stored.progress == STARTING_PROGRESS
    assert await store.claim(NOW + 5) is None
    assert (await store.stats())[RUNNING] == 1


async def test_claim_order_is_priority_then_fifo(store):
    a = await add(store, priority=0)
    b = await add(store, priority=5)
    c = await add(store, priority=5)
    d = await add(store, priority=-1)
    e = await add(store, priority=0)
    order = [(await store.claim(NOW)).id for _ in range(5)]
    assert order == [b.id, c.id, a.id, e.id, d.id]
    assert await store.claim(NOW) is None


async def test_claim_many_takes_jobs_in_claim_order_up_to_the_limit(store):
    low = await add(store, priority=0)
    high = await add(store, priority=5)
    later = await add(store, priority=0, run_at=NOW + 100)
    other = await add(store, priority=0)
    claimed = await store.claim_many(NOW, 2)
    assert [j.id for j in claimed] == [high.id, low.id]
    assert all(j.status == RUNNING and j.attempts == 1 for j in claimed)
    rest = await store.claim_many(NOW, 10)
    assert [j.id for j in rest] == [other.id]  # `later` is not due yet
    assert await store.claim_many(NOW, 10) == []
    assert (await store.get(later.id)).status == PENDING


async def test_claim_skips_jobs_not_yet_due(store):
    later = await add(store, priority=10, run_at=NOW + 100)
    now_job = await add(store)
    assert (await store.claim(NOW)).id == now_job.id
    assert await store.claim(NOW) is None
    assert await store.claim(NOW + 99) is None
    claimed = await store.claim(NOW + 100)
    assert claimed.id == later.id
    assert claimed.run_at is None


async def test_a_due_job_takes_its_place_by_priority(store):
    low = await add(store, priority=0)
    high = await add(store, priority=10, run_at=NOW + 1)
    assert (await store.claim(NOW + 2)).id == high.id
    assert (await store.claim(NOW + 2)).id == low.id


async def test_concurrent_claims_take_each_job_once(store):
    for _ in range(5):
        await add(store)
    claimed = await asyncio.gather(*(store.claim(NOW) for _ in range(12)))
    got = [job.id for job in claimed if job is not None]
    assert sorted(got) == [1, 2, 3, 4, 5]


async def test_claim_counts_attempts_across_runs(store):
    job = await add(store)
    first = await store.claim(NOW)
    first.status, first.run_at = PENDING, NOW + 50  # a retry, as the queue saves it
    first.progress = {"percent": 0, "message": "Waiting to retry"}
    await store.save(first)
    assert await store.claim(NOW + 10) is None
    second = await store.claim(NOW + 50)
    assert second.id == job.id
    assert second.attempts == 2
    assert second.started_at == NOW + 50


async def test_cancelled_and_finished_jobs_are_not_claimed(store):
    a = await add(store)
    b = await add(store)
    await store.cancel_pending(a.id, NOW)
    await finish(store, b)
    assert await store.claim(NOW) is None


# -- next_run_at -------------------------------------------------------------------------


async def test_next_run_at(store):
    assert await store.next_run_at() is None
    await add(store)
    assert await store.next_run_at() is None
    a = await add(store, run_at=NOW + 30)
    await add(store, run_at=NOW + 20)
    await add(store, run_at=NOW + 40)
    assert await store.next_run_at() == NOW + 20
    await store.cancel_pending(3, NOW)
    assert await store.next_run_at() == NOW + 30
    # claim everything due by then: job 1 (no run_at) and job a
    claimed = {(await store.claim(NOW + 35)).id, (await store.claim(NOW + 35)).id}
    assert claimed == {1, a.id}
    assert await store.next_run_at() == NOW + 40
    assert (await store.claim(NOW + 40)).id == 4
    assert await store.next_run_at() is None


async def test_next_run_at_follows_a_saved_run_at(store):
    job = await add(store)
    running = await store.claim(NOW)
    assert await store.next_run_at() is None
    running.status, running.run_at = PENDING, NOW + 7
    await store.save(running)
    assert await store.next_run_at() == NOW + 7
    assert job.id == running.id


# -- save --------------------------------------------------------------------------------


async def test_save_writes_every_field(store):
    job = await add(store)
    running = await store.claim(NOW)
    running.status = COMPLETED
    running.result = {"message": "hi", "echoed": "hi", "nested": [1, {"a": None}]}
    running.progress = {"percent": 100, "message": "Complete"}
    running.completed_at = NOW + 3.25
    running.terminal_seq = 42
    running.error = None
    await store.save(running)
    stored = await store.get(job.id)
    assert stored == running
    assert (await store.stats())[COMPLETED] == 1


async def test_save_of_named_fields_writes_them(store):
    job = await add(store)
    running = await store.claim(NOW)
    running.status, running.result, running.error = COMPLETED, {"n": [1, "ü"]}, None
    running.progress = {"percent": 100, "message": "Complete"}
    running.completed_at, running.terminal_seq = NOW + 2, 7
    await store.save(running, ("status", "progress", "result", "error", "completed_at",
                               "terminal_seq"))
    assert await store.get(job.id) == running
    assert (await store.stats())[COMPLETED] == 1


async def test_saves_of_one_job_made_at_once_keep_the_last(store, single_node):
    job = await add(store)
    running = await store.claim(NOW)
    saves = []
    for percent in (10, 20, 30):
        step = running.copy()
        step.progress = {"percent": percent, "message": f"at {percent}"}
        saves.append(store.save(step))
    await asyncio.gather(*saves)
    assert (await store.get(job.id)).progress == {"percent": 30, "message": "at 30"}


async def test_save_failed_keeps_error(store):
    job = await add(store)
    running = await store.claim(NOW)
    running.status, running.error, running.completed_at = FAILED, "boom: ü ✓", NOW + 1
    await store.save(running)
    stored = await store.get(job.id)
    assert (stored.status, stored.error, stored.completed_at) == (FAILED, "boom: ü ✓", NOW + 1)
    assert stored.result is None


async def test_save_back_to_pending_makes_the_job_claimable_in_its_place(store):
    a = await add(store)
    b = await add(store)
    running = await store.claim(NOW)
    assert running.id == a.id
    running.status, running.progress, running.started_at = PENDING, dict(QUEUED_PROGRESS), None
    await store.save(running)  # a graceful shutdown gives it back
    assert (await store.stats())[PENDING] == 2
    assert (await store.claim(NOW)).id == a.id
    assert (await store.claim(NOW)).id == b.id


async def test_save_of_an_unknown_job_adds_nothing(store):
    ghost = new_job()
    ghost.id = 99
    await store.save(ghost)
    assert await store.get(99) is None
    assert await store.list() == []


# -- finish ------------------------------------------------------------------------------


async def test_finish_writes_the_transition_of_a_running_job(store):
    job = await add(store)
    running = await store.claim(NOW)
    running.status, running.result = COMPLETED, {"echoed": "hi"}
    running.progress, running.completed_at = {"percent": 100, "message": "Complete"}, NOW + 2
    running.terminal_seq = 9
    assert await store.finish(running) is True
    assert await store.get(job.id) == running
    stats = await store.stats()
    assert (stats[RUNNING], stats[COMPLETED]) == (0, 1)


async def test_finish_can_put_a_job_back_to_pending(store):
    a = await add(store)
    b = await add(store)
    running = await store.claim(NOW)
    running.status, running.progress, running.started_at = PENDING, dict(QUEUED_PROGRESS), None
    assert await store.finish(running) is True
    assert (await store.claim(NOW)).id == a.id
    assert (await store.claim(NOW)).id == b.id


async def test_finish_of_a_job_not_running_writes_nothing(store):
    pending = await add(store)
    done = await add(store)
    await finish(store, done)
    for job_id, status in ((pending.id, PENDING), (done.id, COMPLETED)):
        job = await store.get(job_id)
        assert job.status == status
        changed = job.copy()
        changed.status, changed.result, changed.error = FAILED, {"x": 1}, "nope"
        assert await store.finish(changed) is False
        assert await store.get(job_id) == job
    ghost = new_job()
    ghost.id, ghost.status = 99, COMPLETED
    assert await store.finish(ghost) is False
    assert await store.get(99) is None


async def test_finish_after_cancel_running_keeps_the_cancellation(store):
    job = await add(store)
    running = await store.claim(NOW)
    assert (await store.cancel_running(job.id, NOW + 1)).status == CANCELLED
    running.status, running.result, running.completed_at = COMPLETED, {"late": True}, NOW + 2
    assert await store.finish(running) is False
    stored = await store.get(job.id)
    assert (stored.status, stored.result, stored.completed_at) == (CANCELLED, None, NOW + 1)


# -- cancel_running ----------------------------------------------------------------------


async def test_cancel_running(store):
    job = await add(store)
    await store.claim(NOW)
    cancelled = await store.cancel_running(job.id, NOW + 4)
    assert cancelled is not None
    assert (cancelled.id, cancelled.status, cancelled.completed_at) == (job.id, CANCELLED,
                                                                        NOW + 4)
    stored = await store.get(job.id)
    assert (stored.status, stored.completed_at, stored.attempts) == (CANCELLED, NOW + 4, 1)
    stats = await store.stats()
    assert (stats[RUNNING], stats[CANCELLED]) == (0, 1)
    await store.save_progress(job.id, {"percent": 10, "message": "late"})
    assert (await store.get(job.id)).progress == stored.progress
    assert await store.cancel_running(job.id, NOW + 5) is None
    assert await store.recover(3) == []


async def test_cancel_running_leaves_other_jobs(store):
    pending = await add(store)
    done = await add(store)
    await finish(store, done)
    for job_id, status in ((pending.id, PENDING), (done.id, COMPLETED)):
        before = await store.get(job_id)
        assert before.status == status
        assert await store.cancel_running(job_id, NOW) is None
        assert await store.get(job_id) == before
    assert await store.cancel_running(12345, NOW) is None
    assert (await store.claim(NOW)).id == pending.id


async def test_a_job_cancelled_while_running_is_pruned_like_other_finished(store):
    a = await add(store)
    b = await add(store)
    await store.claim(NOW)
    await finish(store, b, at=NOW + 1)
    await store.cancel_running(a.id, NOW + 2)
    assert await store.prune_finished(1) == [(b.id, COMPLETED)]
    assert await store.clear_finished() == [(a.id, CANCELLED)]


# -- save_progress -----------------------------------------------------------------------


async def test_save_progress_of_a_running_job(store):
    job = await add(store)
    await store.claim(NOW)
    await store.save_progress(job.id, {"percent": 40, "message": "2 seconds remaining..."})
    stored = await store.get(job.id)
    assert stored.progress == {"percent": 40, "message": "2 seconds remaining..."}
    assert stored.status == RUNNING
    await store.save_progress(job.id, {"percent": 60, "message": "1 second remaining..."})
    assert (await store.get(job.id)).progress == {"percent": 60,
                                                  "message": "1 second remaining..."}


async def test_late_save_progress_does_not_touch_a_finished_job(store):
    """A coalesced progress write that lands after the completion must not overwrite
    the final progress (nor resurrect anything)."""
    job = await add(store)
    running = await store.claim(NOW)
    running.status, running.completed_at = COMPLETED, NOW + 1
    running.progress = {"percent": 100, "message": "Complete"}
    await store.save(running)
    await store.save_progress(job.id, {"percent": 50, "message": "late"})
    stored = await store.get(job.id)
    assert stored.progress == {"percent": 100, "message": "Complete"}
    assert stored.status == COMPLETED


async def test_save_progress_of_an_unknown_job_is_harmless(store):
    await store.save_progress(12345, {"percent": 1, "message": "x"})
    assert await store.get(12345) is None


# -- cancel_pending ----------------------------------------------------------------------


async def test_cancel_pending(store):
    job = await add(store)
    after, cancelled = await store.cancel_pending(job.id, NOW + 2)
    assert cancelled
    assert after.id == job.id
    assert after.status == CANCELLED
    assert after.completed_at == NOW + 2
    stored = await store.get(job.id)
    assert (stored.status, stored.completed_at) == (CANCELLED, NOW + 2)
    assert (await store.stats())[CANCELLED] == 1
    assert (await store.stats())[PENDING] == 0


async def test_cancel_pending_leaves_running_and_finished_jobs(store):
    running = await add(store)
    done = await add(store)
    await store.claim(NOW)
    await finish(store, done)
    for job_id, status in ((running.id, RUNNING), (done.id, COMPLETED)):
        job, cancelled = await store.cancel_pending(job_id, NOW)
        assert not cancelled
        assert job.id == job_id and job.status == status
        assert (await store.get(job_id)).status == status
    again, cancelled = await store.cancel_pending(running.id + 0, NOW)
    assert not cancelled


async def test_cancel_pending_twice(store):
    job = await add(store)
    assert (await store.cancel_pending(job.id, NOW))[1]
    after, cancelled = await store.cancel_pending(job.id, NOW + 5)
    assert not cancelled
    assert after.status == CANCELLED
    assert after.completed_at == NOW


async def test_cancel_pending_unknown(store):
    assert await store.cancel_pending(7, NOW) == (None, False)


async def test_cancel_pending_of_a_delayed_job(store):
    job = await add(store, run_at=NOW + 10)
    assert (await store.cancel_pending(job.id, NOW))[1]
    assert await store.claim(NOW + 20) is None
    assert await store.next_run_at() is None


# -- clear_finished ----------------------------------------------------------------------


async def test_clear_finished(store):
    jobs = [await add(store) for _ in range(6)]
    await store.claim(NOW)                                  # 1 running
    await finish(store, jobs[1], COMPLETED)                 # 2
    await finish(store, jobs[2], FAILED, error="x")         # 3
    await store.cancel_pending(jobs[3].id, NOW)             # 4
    gone = await store.clear_finished()
    assert sorted(gone) == [(2, COMPLETED), (3, FAILED), (4, CANCELLED)]
    assert await ids(store) == [6, 5, 1]
    assert await store.get(2) is None
    assert await store.clear_finished() == []
    stats = await store.stats()
    assert (stats[PENDING], stats[RUNNING]) == (2, 1)
    assert sum(stats[s] for s in FINISHED) == 0


# -- prune_finished ----------------------------------------------------------------------


async def test_prune_finished_deletes_those_that_finished_first(store):
    jobs = [await add(store) for _ in range(6)]
    # finish in an order unlike the ids: 4, 2, 6, 1
    for t, job in enumerate((jobs[3], jobs[1], jobs[5], jobs[0])):
        await finish(store, job, at=NOW + t)
    gone = await store.prune_finished(2)
    assert sorted(gone) == [(2, COMPLETED), (4, COMPLETED)]
    assert await ids(store) == [6, 5, 3, 1]
    gone = await store.prune_finished(1)
    assert gone == [(6, COMPLETED)]
    assert await ids(store) == [5, 3, 1]


async def test_prune_finished_orders_by_completion_time_then_id(store):
    """The docstring's order: completion time, then id. Saved in an order unlike
    their completion times, and with a tie broken by id."""
    jobs = [await add(store) for _ in range(4)]
    await finish(store, jobs[0], at=NOW + 30)
    await finish(store, jobs[3], at=NOW + 10)   # tie with job 3, saved first
    await finish(store, jobs[2], at=NOW + 10)
    await finish(store, jobs[1], at=NOW + 20)
    first = await store.prune_finished(1)
    assert first == [(3, COMPLETED)]
    rest = await store.prune_finished(2)
    assert rest == [(4, COMPLETED), (2, COMPLETED)]
    assert await ids(store) == [1]


async def test_prune_finished_keeps_unfinished_jobs_and_statuses(store):
    jobs = [await add(store) for _ in range(5)]
    await store.claim(NOW)                                 # 1 running (oldest)
    await store.cancel_pending(jobs[1].id, NOW + 1)        # 2 cancelled
    await finish(store, jobs[2], FAILED, at=NOW + 2, error="e")  # 3 failed
    gone = await store.prune_finished(10)
    assert gone == [(2, CANCELLED), (3, FAILED)]
    assert await ids(store) == [5, 4, 1]
    assert await store.prune_finished(10) == []
    assert await store.prune_finished(0) == []


async def test_prune_finished_zero_deletes_nothing(store):
    job = await add(store)
    await finish(store, job)
    assert await store.prune_finished(0) == []
    assert await ids(store) == [job.id]


# -- stats -------------------------------------------------------------------------------


async def test_stats(store):
    assert await store.stats() == {s: 0 for s in STATUSES}
    jobs = [await add(store) for _ in range(7)]
    await store.claim(NOW)
    await store.claim(NOW)
    await finish(store, jobs[2])
    await finish(store, jobs[3], FAILED, error="x")
    await finish(store, jobs[4], FAILED, error="y")
    await store.cancel_pending(jobs[5].id, NOW)
    assert await store.stats() == {PENDING: 1, RUNNING: 2, COMPLETED: 1, FAILED: 2,
                                   CANCELLED: 1}


# -- recover -----------------------------------------------------------------------------


@pytest.fixture
def single_node(store):
    """``recover`` as the queue calls it on one node; a store shared by several
    nodes takes running jobs back by lease instead (``SharedStore.reap``), so tests
    using this fixture are generated for single-node backends only."""
    assert not store.shared


async def test_recover_puts_running_jobs_back_to_pending(store, single_node):
    a = await add(store)
    b = await add(store)
    c = await add(store)
    await store.claim(NOW)       # a
    await store.save_progress(a.id, {"percent": 50, "message": "halfway"})
    await finish(store, c)
    changed = await store.recover(3)
    assert [j.id for j in changed] == [a.id]
    assert changed[0].status == PENDING
    assert changed[0].interruptions == 1
    stored = await store.get(a.id)
    assert stored.status == PENDING
    assert stored.interruptions == 1
    assert stored.attempts == 1
    assert stored.progress == QUEUED_PROGRESS
    assert stored.error is None
    assert (await store.get(b.id)).status == PENDING
    assert (await store.get(c.id)).status == COMPLETED
    # back in its original place: before b
    again = await store.claim(NOW + 1)
    assert again.id == a.id
    assert again.attempts == 2


async def test_recover_without_running_jobs(store, single_node):
    await add(store)
    assert await store.recover(3) == []
    assert (await store.get(1)).interruptions == 0


async def test_third_interruption_fails_the_job(store, single_node):
    job = await add(store)
    other = await add(store)
    for n in (1, 2):
        claimed = await store.claim(NOW + n)
        assert claimed.id == job.id and claimed.attempts == n
        changed = await store.recover(3)
        assert [(j.id, j.status, j.interruptions) for j in changed] == [(job.id, PENDING, n)]
    assert (await store.claim(NOW + 3)).attempts == 3
    before = time.time()
    changed = await store.recover(3)
    assert [(j.id, j.status, j.error) for j in changed] == [(job.id, FAILED, "interrupted")]
    stored = await store.get(job.id)
    assert (stored.status, stored.error, stored.interruptions, stored.attempts) == (
        FAILED, "interrupted", 3, 3)
    assert stored.completed_at is not None and stored.completed_at >= before - 1
    stats = await store.stats()
    assert (stats[FAILED], stats[RUNNING], stats[PENDING]) == (1, 0, 1)
    assert (await store.claim(NOW + 4)).id == other.id
    assert await store.claim(NOW + 4) is None


async def test_a_graceful_release_does_not_count_as_an_interruption(store, single_node):
    job = await add(store)
    for _ in range(4):
        running = await store.claim(NOW)
        running.status, running.progress, running.started_at = (
            PENDING, dict(QUEUED_PROGRESS), None)
        await store.save(running)
    assert await store.recover(3) == []
    stored = await store.get(job.id)
    assert (stored.status, stored.interruptions, stored.attempts) == (PENDING, 0, 4)


# -- reserve_seq -------------------------------------------------------------------------


async def test_reserve_seq_blocks_increase_and_do_not_overlap(store):
    first = await store.reserve_seq(10, 1)
    assert first >= 1
    second = await store.reserve_seq(10, 1)
    assert second >= first + 10
    third = await store.reserve_seq(1, second)
    assert third >= second + 10


async def test_reserve_seq_respects_at_least(store):
    first = await store.reserve_seq(5, 1000)
    assert first >= 1000
    assert await store.reserve_seq(5, 1) >= first + 5
    assert await store.reserve_seq(5, 5000) >= 5000


async def test_reserve_seq_concurrently(store):
    firsts = await asyncio.gather(*(store.reserve_seq(100, 1) for _ in range(20)))
    ranges = sorted((f, f + 100) for f in firsts)
    for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert start >= end


# -- durable backends: reopen ------------------------------------------------------------


async def test_reopen_keeps_every_job_and_field(store, reopen):
    a = await add(store, "countdown", params={"seconds": 3}, priority=2,
                  idempotency_key="key-a", fingerprint="fp")
    b = await add(store)
    c = await add(store, run_at=NOW + 100)
    done = await store.claim(NOW)           # a (priority 2)
    done.status, done.result = COMPLETED, {"message": "Countdown complete!", "duration": 3}
    done.progress, done.completed_at, done.terminal_seq = (
        {"percent": 100, "message": "Complete"}, NOW + 3, 77)
    await store.save(done)
    before = {j.id: j for j in await store.list()}
    fresh = await reopen()
    after = {j.id: j for j in await fresh.list()}
    assert after == before
    assert after[a.id].result == {"message": "Countdown complete!", "duration": 3}
    assert await fresh.stats() == {PENDING: 2, RUNNING: 0, COMPLETED: 1, FAILED: 0,
                                   CANCELLED: 0}
    again, created = await fresh.add(new_job(idempotency_key="key-a"))
    assert not created and again.id == a.id
    assert await fresh.next_run_at() == NOW + 100
    assert (await fresh.claim(NOW)).id == b.id
    assert (await fresh.claim(NOW + 100)).id == c.id


async def test_reopen_continues_ids(store, reopen):
    for _ in range(3):
        await add(store)
    top = await store.get(3)
    await finish(store, top)
    await store.clear_finished()
    fresh = await reopen()
    assert (await add(fresh)).id == 4


async def test_reopen_then_recover(store, reopen, single_node):
    a = await add(store)
    b = await add(store)
    c = await add(store)
    await store.claim(NOW)
    await store.claim(NOW)
    await store.save_progress(b.id, {"percent": 30, "message": "Echoing in 2 seconds..."})
    fresh = await reopen()
    running = await fresh.get(b.id)
    assert running.status == RUNNING
    assert running.progress == {"percent": 30, "message": "Echoing in 2 seconds..."}
    changed = await fresh.recover(3)
    assert sorted(j.id for j in changed) == [a.id, b.id]
    assert [(await fresh.claim(NOW)).id for _ in range(3)] == [a.id, b.id, c.id]


async def test_reserve_seq_survives_reopen(store, reopen):
    first = await store.reserve_seq(1000, 1)
    second = await store.reserve_seq(1000, 1)
    fresh = await reopen()
    third = await fresh.reserve_seq(1000, 1)
    assert third >= second + 1000 > first
    high = await fresh.reserve_seq(10, 10**9)
    again = await reopen()
    assert await again.reserve_seq(10, 1) >= high + 10


# -- SQLite: group commit ------------------------------------------------------------------


async def test_sqlite_a_failing_call_in_a_batch_spares_the_others(tmp_path):
    """Calls queued together run in one transaction; one that raises after writing
    leaves nothing written, and the calls before and after it are committed."""
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        def write_then_fail(conn):
            conn.execute("UPDATE jobs SET error = 'half done' WHERE id = 1")
            raise RuntimeError("boom")

        gate = threading.Event()
        blocker = store._call(lambda conn: gate.wait(5))
        await asyncio.sleep(0.05)  # the store's thread is inside the blocker's batch
        before = asyncio.ensure_future(store.add(new_job()))
        await asyncio.sleep(0)
        failing = store._call(write_then_fail)
        after = asyncio.ensure_future(store.add(new_job()))
        await asyncio.sleep(0)
        gate.set()  # everything above now runs as one batch
        await blocker
        assert (await before)[0].id == 1
        with pytest.raises(RuntimeError, match="boom"):
            await failing
        assert (await after)[0].id == 2
        assert (await store.get(1)).error is None
        assert (await store.stats())[PENDING] == 2
    finally:
        await store.close()


async def test_sqlite_a_batch_with_many_adds_and_saves(tmp_path):
    """Adds and saves queued together share statements (a multi-row INSERT, one
    UPDATE for many rows): each add gets its own job's id, and of two saves of one
    job the later wins."""
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        first, _ = await store.add(new_job())
        running = await store.claim(NOW)
        gate = threading.Event()
        blocker = store._call(lambda conn: gate.wait(5))
        await asyncio.sleep(0.05)  # the store's thread is inside the blocker's batch
        adds = [asyncio.ensure_future(store.add(new_job(params={"message": f"m{i}",
                                                                   "delay": 1})))
                for i in range(300)]
        saves = []
        for percent in (10, 20, 30):
            step = running.copy()
            step.progress = {"percent": percent, "message": f"at {percent}"}
            saves.append(asyncio.ensure_future(store.save(step, ("progress",))))
        await asyncio.sleep(0)
        gate.set()
        await blocker
        added = [job for job, _ in await asyncio.gather(*adds)]
        await asyncio.gather(*saves)
        assert [job.id for job in added] == list(range(first.id + 1, first.id + 301))
        for i, job in enumerate(added):
            assert (await store.get(job.id)).params == {"message": f"m{i}", "delay": 1}
        assert (await store.get(first.id)).progress == {"percent": 30, "message": "at 30"}
    finally:
        await store.close()
