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
    fanout_windows,
    latency,
    percentiles_ms,
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


def floor_paced(clients: int, per_client: int, events: int, interval: float,
                writer: str = "socket") -> dict:
    """The spread floor: ``events`` stamped frames, ``interval`` apart, from the floor
    loop to ``clients`` load-client processes of ``per_client`` WebSocket readers each
    (the paced case's shape): first-to-last spread and latency of a send loop, and
    how long the loop itself took per frame (``send``: first send to last), of which
    on a CPU (``send_cpu``) and waiting for one (``send_waiting``). ``writer``:
    ``socket`` (``sendall`` on blocking sockets), ``threads`` (the same from two
    threads at once) or ``asyncio`` (``transport.write`` on asyncio's transports,
    from an event loop)."""
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
        for group in groups:
            group.reset()
        window = CpuWindow(proc.pid, [pid for g in groups for pid in g.pids])
        proc.stdin.write(f"pace {events} {interval} {writer}\n")
        proc.stdin.flush()
        sends = np.array(json.loads(proc.stdout.readline())["sends"])
        for group in groups:
            group.wait_for(per_client * events, timeout=60, marked=per_client * events)
        cpu = window.stop()
        pairs = np.concatenate([group.pairs() for group in groups])
    finally:
        for group in groups:
            group.close()
        _end(proc)
    return {"subscribers": total, "client_processes": clients,
            **_prefixed("spread", spreads(pairs)), **_prefixed("latency", latency(pairs)),
            **_prefixed("send", percentiles_ms(sends[:, 1] - sends[:, 0])),
            **_prefixed("send_cpu", percentiles_ms(sends[:, 2])),
            **_prefixed("send_waiting", percentiles_ms(sends[:, 3])),
            "server_cpu_s": cpu["server_cpu_s"], "client_cpu_s": cpu["client_cpu_s"],
            "other_pct": cpu["other_pct"], "disturbed": cpu["disturbed"]}


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


def paced(variant: Variant, ws: int, sse: int, events: int, interval: float,
          processes: str = "shared") -> dict:
    """One job emitting ``events`` progress events ``interval`` apart, followed by
    ``ws`` /ws/queue and ``sse`` /api/jobs/{id}/progress subscribers. Also measures
    RSS per idle subscriber (WebSocket ones first, then SSE). ``processes``: "shared",
    both kinds in the same load-client processes (one per ``MAX_PER_CLIENT``
    subscribers); "by-kind", the WebSocket and the SSE subscribers in processes of
    their own."""
    gate = WORK / f"gate-{variant.name}-{ws}-{sse}"
    gate.unlink(missing_ok=True)
    with Server(variant) as server:
        job_id = create_jobs(server.port, 1, {"events": events, "interval": interval,
                                              "gate": str(gate)})[0]
        sse_path = f"/api/jobs/{job_id}/progress"
        rss0 = _settle(server)
        if processes == "shared":
            groups = [Clients(server.port, ws=ws, sse=sse, sse_path=sse_path)]
        else:
            groups = [Clients(server.port, ws=ws), Clients(server.port, sse=sse,
                                                           sse_path=sse_path)]
        try:
            ws_connect = _connect(groups, "ws")
            rss1 = _settle(server)
            sse_connect = _connect(groups, "sse")
            rss2 = _settle(server)
            result = _open_gate(server, gate, groups, events, interval)
        finally:
            for group in groups:
                group.close()
    gate.unlink(missing_ok=True)
    if server.fanout_log is not None:  # run.py --fanout-probe: the server's side
        windows = fanout_windows(server.fanout_log, result.pop("pairs"), interval / 2)
        for name, figures in windows.items():
            result.update(_prefixed("after_last_write" if name == "after"
                                    else f"server_{name}", figures))
    result.pop("pairs", None)
    return {
        "ws": ws_connect["connected"], "sse": sse_connect["connected"],
        "client_processes": sum(len(g.procs) for g in groups),
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


def _connect(groups: list[Clients], kind: str) -> dict:
    """Connect the ``kind`` subscribers of every group that has some."""
    answers = [g.connect(kind) for g in groups if getattr(g, kind)]
    return {"connected": sum(a["connected"] for a in answers),
            "failed": sum(a["failed"] for a in answers),
            "wall_s": sum(a["wall_s"] for a in answers),
            "p50_ms": max((a["p50_ms"] for a in answers), default=0.0)}


def _open_gate(server: Server, gate: Path, groups: list[Clients], events: int,
               interval: float) -> dict:
    """Let the gated job run; wait for every event at every subscriber."""
    for group in groups:
        group.reset()
    window = CpuWindow(server.pid, [pid for g in groups for pid in g.pids])
    gate.touch()
    # Not a word to the load clients while the events fan out: every ``count`` makes
    # them parse what arrived (see bench/loadclient.py), which is best done after.
    time.sleep(events * interval)
    counts = [g.wait_for(g.ws * (events + WS_AFTER_GATE) + g.sse * (events + SSE_AFTER_GATE),
                         120, marked=g.expected * events) for g in groups]
    cpu = window.stop()
    ws_pairs = np.concatenate([g.pairs("ws") for g in groups])
    sse_pairs = np.concatenate([g.pairs("sse") for g in groups])
    both = np.concatenate([ws_pairs, sse_pairs])
    expected = sum(g.expected for g in groups)
    marked = sum(c["marked"] for c in counts)
    delivered = sum(c["messages"] for c in counts)
    return {
        "marked_expected": expected * events, "marked": marked,
        "delivered_ratio": marked / max(1, expected * events),
        "every_event_everywhere": all(_all_got(c, events) for c in counts),
        "marked_min": min(min(c["marked_min"].values()) for c in counts),
        "lost_ws": sum(c["lost"].get("ws", 0) + c["lost"].get("ws-close", 0) for c in counts),
        **_prefixed("spread", spreads(both)), **_prefixed("spread_ws", spreads(ws_pairs)),
        **_prefixed("spread_sse", spreads(sse_pairs)), **_prefixed("latency", latency(both)),
        "server_cpu_s": cpu["server_cpu_s"], "client_cpu_s": cpu["client_cpu_s"],
        "cpu_us_per_message": cpu["server_cpu_s"] / max(1, delivered) * 1e6,
        "other_pct": cpu["other_pct"], "disturbed": cpu["disturbed"],
        "pairs": both,
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


def queue_ceiling(variant: Variant, seconds: float) -> dict:
    """What stands between the queue over HTTP and the same server's stats rate, on
    one server (rawjobs with bench/post_ceiling.py), one second of each in turn,
    ``seconds`` turns, so that a change in the host's speed falls on all three:
    ``GET /api/stats`` (``wrk -t1 -c64``); the create request of ``queue_http``
    (``wrk -t1 -c100``, the same body) sent to ``POST /api/bench/no-job``, which
    reads it and answers a job object as a create does but creates nothing; and the
    same request to ``POST /api/jobs`` (worker concurrency 100; the worker keeps up
    within the turn). At least 3 turns. Rates are medians of the turns;
    ``*_to_stats`` the medians of each turn's rate over its stats rate. ``job_us``:
    what a job adds to a POST (create, run, complete), 1/jobs - 1/no-job per turn;
    ``budget_us``: what it may add for 0.7 × the stats rate, 1/(0.7 stats) -
    1/no-job. Both are time per request at wrk's rates, which is the server's CPU
    time per request while it keeps one core busy (``server_busy``)."""
    turns: dict[str, list[float]] = {k: [] for k in ("stats", "no_job", "jobs", "no_job_to_stats",
                                                    "jobs_to_stats", "job_us", "budget_us")}
    non_2xx = 0.0
    with Server(variant, concurrency=100, preload="bench.post_ceiling") as server:
        window = CpuWindow(server.pid, [])
        for _ in range(max(3, round(seconds))):
            rates = {}
            for name, path, connections, script in (
                    ("stats", "/api/stats", 64, None),
                    ("no_job", "/api/bench/no-job", 100, POST_SCRIPT),
                    ("jobs", "/api/jobs", 100, POST_SCRIPT)):
                figures = wrk(server.port, path, 1, connections, script=script)
                rates[name] = max(1.0, figures["req_per_s"])
                non_2xx += figures["non_2xx"]
            for name, rate in rates.items():
                turns[name].append(rate)
            turns["no_job_to_stats"].append(rates["no_job"] / rates["stats"])
            turns["jobs_to_stats"].append(rates["jobs"] / rates["stats"])
            turns["job_us"].append(1e6 / rates["jobs"] - 1e6 / rates["no_job"])
            turns["budget_us"].append(1e6 / (0.7 * rates["stats"]) - 1e6 / rates["no_job"])
        cpu = window.stop()
    medians = {k: float(np.median(v)) for k, v in turns.items()}
    return {"stats_per_s": medians.pop("stats"), "no_job_per_s": medians.pop("no_job"),
            "jobs_per_s": medians.pop("jobs"), **medians, "non_2xx": non_2xx,
            "server_busy": cpu["server_cpu_s"] / cpu["wall_s"],
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
    """bench/queue_throughput.py (in process, no HTTP, the server's GC settings), if
    present: its rates as
    ``{store}_{run}_{rate}`` figures, e.g. ``memory_mixed_jobs_per_s``."""
    script = BENCH / "queue_throughput.py"
    if not script.exists():
        return None
    out = WORK / f"queue-inprocess-{time.monotonic_ns()}.json"
    proc = subprocess.run([sys.executable, str(script), "--memory-jobs", str(memory_jobs),
                           "--sqlite-jobs", str(sqlite_jobs), "--gc", "server",
                           "--json", str(out)],
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
