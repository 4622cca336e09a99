"""The benchmark cases (issue 6, item 3). Each function runs one case once against a
fresh server and returns a flat dict of figures; bench/run.py repeats them and takes
medians. Messages per /ws/queue subscriber are known exactly (see ``WS_PER_JOB``), so
"delivered/expected" is exact."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import (
    BENCH,
    WORK,
    Clients,
    CpuWindow,
    Http,
    Server,
    StatsProber,
    Variant,
    create_jobs,
    latency,
    spreads,
    wrk,
)

WS_PER_JOB = 6  # job_created, job_started, worker_stats, final progress, completed, worker_stats
WS_AFTER_GATE = 3  # final progress, job_completed, worker_stats
SSE_AFTER_GATE = 2  # final progress, complete
POST_SCRIPT = BENCH / "post_job.lua"


def _settle(server: Server) -> int:
    """RSS (KiB) once the server has been idle for a moment."""
    time.sleep(0.5)
    return server.rss()


def floor(subscribers: int, rounds: int) -> dict:
    """The socket.send() floor with ``subscribers`` loopback WebSocket readers: plain
    sockets (Nagle on), then with TCP_NODELAY as asyncio's transports have it."""
    proc = subprocess.Popen([sys.executable, str(BENCH / "floor.py"),
                             "--subscribers", str(subscribers)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(proc.stdout.readline())["port"]
        with Clients(port, ws=subscribers) as clients:
            connect = clients.connect()
            json.loads(proc.stdout.readline())  # {"connected": N}
            plain = _floor_round(proc, clients, rounds, "")
            nodelay = _floor_round(proc, clients, rounds, "nodelay")
    finally:
        _end(proc)
    return {"subscribers": subscribers, "us_per_message": plain["us_per_message"],
            "system_share": plain["system_s"] / plain["cpu_s"] if plain["cpu_s"] else 0.0,
            "us_per_message_nodelay": nodelay["us_per_message"],
            "messages": plain["messages"] + nodelay["messages"],
            "delivered": plain["delivered"] + nodelay["delivered"],
            "connect_per_s": connect["connected"] / connect["wall_s"],
            "other_pct": max(plain["other_pct"], nodelay["other_pct"]),
            "disturbed": plain["disturbed"] or nodelay["disturbed"]}


def floor_paced(clients: int, per_client: int, events: int, interval: float) -> dict:
    """The spread floor: ``events`` stamped frames, ``interval`` apart, from the floor
    loop to ``clients`` load-client processes of ``per_client`` WebSocket readers each
    (the paced case's shape): first-to-last spread and latency of a send loop."""
    total = clients * per_client
    proc = subprocess.Popen([sys.executable, str(BENCH / "floor.py"), "--subscribers",
                             str(total)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    groups: list[Clients] = []
    try:
        port = json.loads(proc.stdout.readline())["port"]
        groups = [Clients(port, ws=per_client) for _ in range(clients)]
        for group in groups:
            group.connect()
        json.loads(proc.stdout.readline())  # {"connected": N}
        proc.stdin.write(f"pace {events} {interval}\n")
        proc.stdin.flush()
        json.loads(proc.stdout.readline())
        for group in groups:
            group.wait_for(per_client * events, timeout=60, marked=per_client * events)
        pairs = np.concatenate([group.pairs() for group in groups])
    finally:
        for group in groups:
            group.close()
        _end(proc)
    return {"subscribers": total, **_prefixed("spread", spreads(pairs)),
            **_prefixed("latency", latency(pairs))}


def _floor_round(proc: subprocess.Popen, clients: Clients, rounds: int, option: str) -> dict:
    clients.reset()
    window = CpuWindow(proc.pid, clients.pids)
    proc.stdin.write(f"go {rounds} {option}\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    counts = clients.wait_for(result["messages"], timeout=120)
    cpu = window.stop()
    return {**result, "delivered": counts["messages"], "other_pct": cpu["other_pct"],
            "disturbed": cpu["disturbed"]}


def _end(proc: subprocess.Popen) -> None:
    """Tell the floor process to quit (end of its stdin); kill it if it lingers."""
    try:
        proc.stdin.close()
        proc.wait(10)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()
        proc.wait()


def burst(variant: Variant, subscribers: int, jobs: int, events: int,
          concurrency: int) -> dict:
    """``jobs`` bench jobs (``events`` progress events each, no pause) created back
    to back while ``subscribers`` /ws/queue clients listen and a prober polls
    GET /api/stats."""
    with Server(variant, concurrency) as server:
        rss0 = _settle(server)
        with Clients(server.port, ws=subscribers) as clients:
            connect = clients.connect()
            rss1 = _settle(server)
            clients.reset()
            window = CpuWindow(server.pid, clients.pids)
            prober = StatsProber(server.port)
            prober.start()
            create_jobs(server.port, jobs, {"events": events, "interval": 0})
            expected = subscribers * jobs * (WS_PER_JOB + events)
            marked_expected = subscribers * jobs * events
            counts = clients.wait_for(expected, timeout=600, marked=marked_expected)
            cpu = window.stop()
            stats = prober.stop()
            pairs = clients.pairs()
    delivered = counts["messages"]
    return {
        "subscribers": subscribers, "connected": connect["connected"],
        "connect_p50_ms": connect["p50_ms"], "connect_p99_ms": connect["p99_ms"],
        "connect_per_s": connect["connected"] / connect["wall_s"],
        "rss_per_sub_kib": (rss1 - rss0) / max(1, connect["connected"]),
        "expected": expected, "delivered": delivered,
        "delivered_ratio": counts["marked"] / max(1, marked_expected),
        "marked_expected": marked_expected, "marked": counts["marked"],
        "lost": sum(counts["lost"].values()),
        "server_cpu_s": cpu["server_cpu_s"],
        "cpu_us_per_message": cpu["server_cpu_s"] / max(1, delivered) * 1e6,
        "system_share": cpu["server_system_s"] / cpu["server_cpu_s"] if cpu["server_cpu_s"]
        else 0.0,
        "duration_s": cpu["wall_s"],
        **_prefixed("latency", latency(pairs)), **_prefixed("stats", stats),
        "other_pct": cpu["other_pct"], "disturbed": cpu["disturbed"],
    }


def paced(variant: Variant, ws: int, sse: int, events: int, interval: float) -> dict:
    """One job emitting ``events`` progress events ``interval`` apart, followed by
    ``ws`` /ws/queue and ``sse`` /api/jobs/{id}/progress subscribers. Also measures
    RSS per idle subscriber (WebSocket ones first, then SSE)."""
    gate = WORK / f"gate-{variant.name}-{ws}-{sse}"
    gate.unlink(missing_ok=True)
    with Server(variant) as server:
        job_id = create_jobs(server.port, 1, {"events": events, "interval": interval,
                                              "gate": str(gate)})[0]
        rss0 = _settle(server)
        with Clients(server.port, ws=ws) as ws_clients, \
                Clients(server.port, sse=sse, sse_path=f"/api/jobs/{job_id}/progress") \
                as sse_clients:
            ws_connect = ws_clients.connect()
            rss1 = _settle(server)
            sse_connect = sse_clients.connect()
            rss2 = _settle(server)
            result = _open_gate(server, gate, ws_clients, sse_clients, events)
    gate.unlink(missing_ok=True)
    return {
        "ws": ws_connect["connected"], "sse": sse_connect["connected"],
        "connect_failed": ws_connect["failed"] + sse_connect["failed"],
        "ws_connect_p50_ms": ws_connect["p50_ms"], "sse_connect_p50_ms": sse_connect["p50_ms"],
        "connect_per_s": (ws_connect["connected"] + sse_connect["connected"])
        / (ws_connect["wall_s"] + sse_connect["wall_s"]),
        "rss_per_ws_kib": (rss1 - rss0) / max(1, ws_connect["connected"]),
        "rss_per_sse_kib": (rss2 - rss1) / max(1, sse_connect["connected"]),
        "rss_per_sub_kib": (rss2 - rss0) / max(1, ws_connect["connected"]
                                               + sse_connect["connected"]),
        **result,
    }


def _open_gate(server: Server, gate: Path, ws_clients: Clients, sse_clients: Clients,
               events: int) -> dict:
    """Let the gated job run; wait for every event at every subscriber."""
    for c in (ws_clients, sse_clients):
        c.reset()
    window = CpuWindow(server.pid, ws_clients.pids + sse_clients.pids)
    gate.touch()
    ws_counts = ws_clients.wait_for(ws_clients.expected * (events + WS_AFTER_GATE), 120,
                                    marked=ws_clients.expected * events)
    sse_counts = sse_clients.wait_for(sse_clients.expected * (events + SSE_AFTER_GATE), 60,
                                      marked=sse_clients.expected * events)
    cpu = window.stop()
    ws_pairs, sse_pairs = ws_clients.pairs(), sse_clients.pairs()
    both = np.concatenate([ws_pairs, sse_pairs])
    marked_expected = (ws_clients.expected + sse_clients.expected) * events
    delivered = ws_counts["messages"] + sse_counts["messages"]
    return {
        "marked_expected": marked_expected,
        "marked": ws_counts["marked"] + sse_counts["marked"],
        "delivered_ratio": (ws_counts["marked"] + sse_counts["marked"]) / max(1, marked_expected),
        "every_event_everywhere": _all_got(ws_counts, events) and _all_got(sse_counts, events),
        "lost_ws": sum(ws_counts["lost"].values()),
        **_prefixed("spread", spreads(both)), **_prefixed("spread_ws", spreads(ws_pairs)),
        **_prefixed("spread_sse", spreads(sse_pairs)), **_prefixed("latency", latency(both)),
        "server_cpu_s": cpu["server_cpu_s"],
        "cpu_us_per_message": cpu["server_cpu_s"] / max(1, delivered) * 1e6,
        "other_pct": cpu["other_pct"], "disturbed": cpu["disturbed"],
    }


def _all_got(counts: dict, events: int) -> bool:
    return all(v == events for v in counts["marked_min"].values())


def stats_wrk(variant: Variant, seconds: float) -> dict:
    """GET /api/stats throughput: ``wrk -t1 -c64``."""
    with Server(variant) as server:
        window = CpuWindow(server.pid, [])
        figures = wrk(server.port, "/api/stats", seconds, 64)
        cpu = window.stop()
    return {**figures, "server_cpu_s": cpu["server_cpu_s"],
            "cpu_us_per_request": cpu["server_cpu_s"] / max(1, figures["requests"]) * 1e6,
            "other_pct": cpu["other_pct"], "disturbed": cpu["disturbed"]}


def queue_http(variant: Variant, seconds: float, db: str = ":memory:") -> dict:
    """No-op bench jobs POSTed by ``wrk -t1 -c100`` (keep-alive) to a server with
    worker concurrency 100: jobs created per second, and created-and-completed per
    second (from the first POST until the last job completed). Counts come from the
    job ids (assigned 1, 2, ...) and the worker's ``processed``, which pruning of
    finished jobs does not change."""
    with Server(variant, concurrency=100, db=db) as server:
        window = CpuWindow(server.pid, [])
        started = time.perf_counter()
        figures = wrk(server.port, "/api/jobs", seconds, 100, script=POST_SCRIPT)
        created = create_jobs(server.port, 1, {"events": 0})[0]
        done_at = _wait_processed(server.port, created)
        cpu = window.stop()
    _remove_db(db)
    return {"created_per_s": created / seconds, "created": created,
            "completed_per_s": created / (done_at - started),
            "cpu_us_per_job": cpu["server_cpu_s"] / created * 1e6,
            "server_busy": cpu["server_cpu_s"] / cpu["wall_s"],
            "non_2xx": figures["non_2xx"], "wrk_req_per_s": figures["req_per_s"],
            "other_pct": cpu["other_pct"], "disturbed": cpu["disturbed"]}


def _wait_processed(port: int, jobs: int, timeout: float = 120) -> float:
    """Poll GET /api/stats until the worker has processed ``jobs``; returns
    time.perf_counter() then. Raises TimeoutError."""
    http = Http(port)
    deadline = time.perf_counter() + timeout
    while http.request("GET", "/api/stats")[1]["worker"]["processed"] < jobs:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{jobs} jobs not processed in {timeout} s")
        time.sleep(0.01)
    http.close()
    return time.perf_counter()


def _remove_db(db: str) -> None:
    if db != ":memory:":
        for suffix in ("", "-wal", "-shm"):
            Path(db + suffix).unlink(missing_ok=True)


def queue_inprocess(memory_jobs: int, sqlite_jobs: int) -> dict | None:
    """bench/queue_throughput.py (in process, no HTTP), if present: its rates as
    ``{store}_{run}_{rate}`` figures, e.g. ``memory_mixed_jobs_per_s``."""
    script = BENCH / "queue_throughput.py"
    if not script.exists():
        return None
    out = WORK / f"queue-inprocess-{time.monotonic_ns()}.json"
    proc = subprocess.run([sys.executable, str(script), "--memory-jobs", str(memory_jobs),
                           "--sqlite-jobs", str(sqlite_jobs), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr or proc.stdout)[-500:]}
    figures = {}
    for row in json.loads(out.read_text())["results"]:
        for key, value in row.items():
            if key.endswith("_per_s") and value is not None:
                figures[f"{row['store']}_{row['run']}_{key}"] = value
    out.unlink()
    return figures


def _prefixed(prefix: str, figures: dict) -> dict:
    return {f"{prefix}_{k}_ms" if k != "n" else f"{prefix}_n": v for k, v in figures.items()}
