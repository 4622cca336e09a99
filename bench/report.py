"""Turn bench/run.py results into the Markdown table, the target checks and the chart."""

from __future__ import annotations

from pathlib import Path

# (case, figure key, label, unit)
ROWS = [
    ("burst-{n}", "cpu_us_per_message", "Burst, {n} WS: server CPU per delivered message", "µs"),
    ("burst-{n}", "latency_p50_ms", "Burst, {n} WS: latency p50", "ms"),
    ("burst-{n}", "latency_p99_ms", "Burst, {n} WS: latency p99", "ms"),
    ("burst-{n}", "latency_max_ms", "Burst, {n} WS: latency max", "ms"),
    ("burst-{n}", "delivered_ratio", "Burst, {n} WS: progress events delivered / expected", ""),
    ("burst-{n}", "stats_p99_ms", "Burst, {n} WS: GET /api/stats p99 during it", "ms"),
    ("burst-{n}", "duration_s", "Burst, {n} WS: until the last message arrived", "s"),
    ("burst-{n}", "connect_p50_ms", "Burst, {n} WS: connect p50 (200 in flight)", "ms"),
    ("burst-{n}", "connect_per_s", "Burst, {n} WS: connects per second", "/s"),
    ("burst-{n}", "rss_per_sub_kib", "Burst, {n} WS: RSS per idle subscriber", "KiB"),
]
SINGLE_ROWS = [
    ("stats-10000", "stats_p99_ms", "10,000 WS: GET /api/stats p99 during the fan-out", "ms"),
    ("stats-10000", "cpu_us_per_message", "10,000 WS: server CPU per delivered message", "µs"),
    ("stats-10000", "latency_p99_ms", "10,000 WS: latency p99", "ms"),
    ("stats-10000", "delivered_ratio", "10,000 WS: delivered / expected", ""),
    ("paced", "spread_p50_ms", "Paced, 1k SSE + 1k WS: first-to-last spread p50", "ms"),
    ("paced", "spread_ws_p50_ms", "Paced: spread p50, WS only", "ms"),
    ("paced", "spread_sse_p50_ms", "Paced: spread p50, SSE only", "ms"),
    ("paced", "latency_p50_ms", "Paced: latency p50", "ms"),
    ("paced", "latency_p99_ms", "Paced: latency p99", "ms"),
    ("paced", "delivered_ratio", "Paced: delivered / expected", ""),
    ("paced", "rss_per_ws_kib", "RSS per idle WS subscriber (1,000)", "KiB"),
    ("paced", "rss_per_sse_kib", "RSS per idle SSE subscriber (1,000)", "KiB"),
    ("hold", "ws", "Hold: WS subscribers connected (of 9,000)", ""),
    ("hold", "sse", "Hold: SSE subscribers connected (of 9,000)", ""),
    ("hold", "delivered_ratio", "Hold: delivered / expected", ""),
    ("hold", "rss_per_ws_kib", "Hold: RSS per idle WS subscriber (9,000)", "KiB"),
    ("hold", "rss_per_sse_kib", "Hold: RSS per idle SSE subscriber (9,000)", "KiB"),
    ("hold", "spread_p50_ms", "Hold: first-to-last spread p50 (18,000)", "ms"),
    ("hold", "connect_per_s", "Hold: connects per second", "/s"),
    ("wrk", "req_per_s", "GET /api/stats, wrk -t1 -c64", "req/s"),
    ("wrk", "cpu_us_per_request", "GET /api/stats: server CPU per request", "µs"),
    ("queue-memory", "created_per_s", "Queue over HTTP (memory): jobs created", "/s"),
    ("queue-memory", "completed_per_s", "Queue over HTTP (memory): created and completed", "/s"),
    ("queue-memory", "cpu_us_per_job", "Queue over HTTP (memory): server CPU per job", "µs"),
    ("queue-memory", "server_busy", "Queue over HTTP (memory): server CPU busy share", ""),
    ("queue-sqlite", "completed_per_s", "Queue over HTTP (SQLite): created and completed", "/s"),
    ("queue-ceiling", "no_job_per_s", "POST that creates no job (bench/post_ceiling.py)", "/s"),
    ("queue-ceiling", "no_job_to_stats", "POST that creates no job / GET /api/stats, same server",
     ""),
    ("queue-ceiling", "jobs_to_stats", "POST /api/jobs / GET /api/stats, same server, same turns",
     ""),
    ("queue-ceiling", "job_us", "What a job adds to its POST (same server)", "µs"),
    ("queue-ceiling", "budget_us", "What 0.7 × the stats rate allows a job to add", "µs"),
]
SIZES = (1000, 5000)


def _median(results: dict, case: str, variant: str, key: str) -> float | None:
    try:
        return results["cases"][case]["variants"][variant]["median"].get(key)
    except KeyError:
        return None


def _floor(results: dict, n: int) -> float | None:
    return _median(results, f"floor-{n}", "-", "us_per_message")


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "—"


def _rows() -> list[tuple[str, str, str, str]]:
    rows = [(c.format(n=n), k, label.format(n=f"{n:,}"), unit)
            for n in SIZES for c, k, label, unit in ROWS]
    return rows + SINGLE_ROWS


def _disturbed(results: dict, case: str) -> str:
    variants = results["cases"].get(case, {}).get("variants", {})
    bad = sum(v["disturbed_runs"] for v in variants.values())
    total = sum(len(v["runs"]) for v in variants.values())
    return f"{bad}/{total}"


def markdown(results: dict) -> str:
    """The figures table (every figure with rawjobs/peer), floor rows, targets."""
    pairs = [("rawjobs", "peer")]
    if "rawjobs+uvloop" in results["variants"]:
        pairs.append(("rawjobs+uvloop", "peer+uvloop"))
    head = "| figure | unit |" + "".join(f" {a} | {b} | ratio |" for a, b in pairs)
    lines = [f"## rawjobs vs uvicorn + Starlette ({results['mode']} run)", "",
             _machine_line(results), "", head + " disturbed runs |",
             "|---|---|" + "---:|---:|---:|" * len(pairs) + "---:|"]
    for case, key, label, unit in _rows():
        if case not in results["cases"]:
            continue
        cells = ""
        for a, b in pairs:
            va, vb = (_median(results, case, v, key) for v in (a, b))
            cells += f" {_fmt(va)} | {_fmt(vb)} | {_ratio(va, vb)} |"
        lines.append(f"| {label} | {unit} |{cells} {_disturbed(results, case)} |")
    lines += ["", *_floor_lines(results, pairs), "", *_target_lines(results)]
    lines += ["", *_inprocess_lines(results)]
    return "\n".join(lines) + "\n"


def _machine_line(results: dict) -> str:
    m = results["machine"]
    return (f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
            f"{m['python']}; fd hard limit {m['fd_hard_limit']}; load client on "
            f"{m.get('load_client_loop', 'asyncio')}; rawjobs at "
            f"{m.get('rawjobs_commit', '?')}; suite ran "
            f"{results.get('duration_s', 0):.0f} s. Ratio = rawjobs / peer.")


def _floor_lines(results: dict, pairs: list[tuple[str, str]]) -> list[str]:
    lines = ["| send() floor and burst CPU against it | floor µs/msg | TCP_NODELAY floor |"
             + "".join(f" {a} ÷ floor | {b} ÷ floor |" for a, b in pairs),
             "|---|---:|---:|" + "---:|---:|" * len(pairs)]
    for n in (1000, 5000, 10000):
        floor = _floor(results, n)
        if floor is None:
            continue
        nodelay = _median(results, f"floor-{n}", "-", "us_per_message_nodelay")
        case = f"burst-{n}" if n != 10000 else "stats-10000"
        cells = "".join(f" {_ratio(_median(results, case, a, 'cpu_us_per_message'), floor)} |"
                        f" {_ratio(_median(results, case, b, 'cpu_us_per_message'), floor)} |"
                        for a, b in pairs)
        lines.append(f"| {n:,} subscribers | {floor:.2f} | {_fmt(nodelay)} |{cells}")
    spread = _median(results, "floor-paced", "-", "spread_p50_ms")
    if spread is not None:
        case = results["cases"]["floor-paced"]
        variant = case["variants"]["-"]
        processes = case["params"].get("clients", 1)
        send, cpu, waiting = (_median(results, "floor-paced", "-", f"{key}_p50_ms")
                              for key in ("send", "send_cpu", "send_waiting"))
        lines += ["", f"Spread floor: the floor loop sending one stamped frame to 2,000 "
                      f"readers ({processes} load-client process{'es' if processes > 1 else ''}"
                      f", as in the paced case): first-to-last spread p50 {_fmt(spread)} ms, "
                      f"the send loop itself took {_fmt(send)} ms (on a CPU {_fmt(cpu)} ms, "
                      f"waiting for one {_fmt(waiting)} ms) "
                      f"({variant['disturbed_runs']}/{len(variant['runs'])} runs disturbed)."]
    lines += _asyncio_floor_lines(results)
    write = _median(results, "paced", "rawjobs", "server_write_p50_ms")
    if write is not None:
        cpu, waiting, after = (_median(results, "paced", "rawjobs", f"{key}_p50_ms") for key
                               in ("server_write_cpu", "server_write_waiting",
                                   "after_last_write"))
        lines += ["", f"Paced, rawjobs' own timestamps (`--fanout-probe`): its first write "
                      f"of an event to its last, p50 {_fmt(write)} ms (on a CPU "
                      f"{_fmt(cpu)} ms, waiting for one {_fmt(waiting)} ms); the last "
                      f"subscriber's receive time after that last write, p50 "
                      f"{_fmt(after)} ms."]
    return lines


def _asyncio_floor_lines(results: dict) -> list[str]:
    lines = []
    spread = _median(results, "floor-paced-threads", "-", "spread_p50_ms")
    if spread is not None:
        send = _median(results, "floor-paced-threads", "-", "send_p50_ms")
        lines += ["", f"Spread floor with two cores writing: the same loop, this thread and "
                      f"a second one sending at once: spread p50 {_fmt(spread)} ms, the send "
                      f"loop {_fmt(send)} ms."]
    spread = _median(results, "floor-paced-asyncio", "-", "spread_p50_ms")
    if spread is not None:
        send, cpu = (_median(results, "floor-paced-asyncio", "-", f"{key}_p50_ms")
                     for key in ("send", "send_cpu"))
        lines += ["", f"Spread floor through asyncio: the same frames written with asyncio's "
                      f"`transport.write` from an event loop, no server code: spread p50 "
                      f"{_fmt(spread)} ms, the write loop {_fmt(send)} ms (on a CPU "
                      f"{_fmt(cpu)} ms)."]
    return lines


def _target_lines(results: dict) -> list[str]:
    lines = ["| target (rawjobs, issue 6) | measured | met |", "|---|---|---|"]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return lines


def _inprocess_lines(results: dict) -> list[str]:
    median = _median(results, "queue-inprocess", "-", "memory_mixed_jobs_per_s")
    if median is None:
        return ["In-process queue throughput: bench/queue_throughput.py not run or failed."]
    figures = results["cases"]["queue-inprocess"]["variants"]["-"]["median"]
    lines = ["| queue in process (bench/queue_throughput.py), rawjobs | jobs/s |", "|---|---:|"]
    for key, value in figures.items():
        if key.endswith("_per_s"):
            lines.append(f"| {key.removesuffix('_per_s').replace('_', ' ')} | {_fmt(value)} |")
    return lines


# -- targets ---------------------------------------------------------------------------

def _check(target: str, measured: str, met: bool | None) -> dict:
    return {"target": target, "measured": measured, "met": met}


def targets(results: dict) -> list[dict]:
    """Each issue-6 target, what was measured, and whether it is met (None: not run)."""
    m = lambda case, key, v="rawjobs": _median(results, case, v, key)  # noqa: E731
    out = [_hold_target(m), _rss_target(m)]
    for n in SIZES:
        out += _burst_targets(results, m, n)
    spread, peer_spread = m("paced", "spread_p50_ms"), m("paced", "spread_p50_ms", "peer")
    floor = _median(results, "floor-paced", "-", "spread_p50_ms")
    asyncio_floor = _median(results, "floor-paced-asyncio", "-", "spread_p50_ms")
    threads_floor = _median(results, "floor-paced-threads", "-", "spread_p50_ms")
    out.append(_check("paced spread p50 ≤ 1/4 of the peer's",
                      f"{_fmt(spread)} ms vs {_fmt(peer_spread)} ms (spread floor "
                      f"{_fmt(floor)} ms, two threads sending {_fmt(threads_floor)} ms"
                      f"{_of_peer(threads_floor, peer_spread)}; through asyncio's "
                      f"transports {_fmt(asyncio_floor)} ms)",
                      None if spread is None or not peer_spread else spread <= peer_spread / 4))
    p99 = m("stats-10000", "stats_p99_ms")
    out.append(_check("GET /api/stats p99 < 50 ms during a fan-out to 10,000",
                      f"{_fmt(p99)} ms", None if p99 is None else p99 < 50))
    rps, peer_rps = m("wrk", "req_per_s"), m("wrk", "req_per_s", "peer")
    out.append(_check("GET /api/stats req/s ≥ 1.5 × the h11 peer's",
                      f"{_fmt(rps)} vs {_fmt(peer_rps)}",
                      None if rps is None or not peer_rps else rps >= 1.5 * peer_rps))
    for store, floor in (("memory", 20000), ("sqlite", 5000)):
        jobs = _median(results, "queue-inprocess", "-", f"{store}_mixed_jobs_per_s")
        out.append(_check(f"queue in process ({store}) ≥ {floor:,} jobs/s added and completed",
                          f"{_fmt(jobs)} jobs/s", None if jobs is None else jobs >= floor))
    for store in ("memory", "sqlite"):
        jobs = m(f"queue-{store}", "completed_per_s")
        out.append(_check(f"queue over HTTP ({store}) ≥ 0.7 × GET /api/stats req/s",
                          f"{_fmt(jobs)} jobs/s vs {_fmt(rps)} req/s"
                          + ("" if jobs is None else _ceiling_text(results, m, store)),
                          None if jobs is None or not rps else jobs >= 0.7 * rps))
    return out


def _of_peer(spread: float | None, peer_spread: float | None) -> str:
    return f" = {spread / peer_spread:.2f} × the peer's" if spread and peer_spread else ""


def _ceiling_text(results: dict, m, store: str) -> str:
    """What stands in the way of the over-HTTP target, from the queue-ceiling case (one
    server, turn by turn): a POST that creates no job against GET /api/stats, what a
    job adds to its POST, what 0.7 allows it to add, and (queue-inprocess) what a job
    takes in process alone, with no HTTP."""
    ceiling = m("queue-ceiling", "no_job_to_stats")
    if ceiling is None:
        return ""
    text = (" (one server with the memory store, turn by turn: a POST that creates no job "
            f"{ceiling:.2f} ×")
    if store == "memory":
        text += (f", creating one {_fmt(m('queue-ceiling', 'jobs_to_stats'))} ×; a job adds "
                 f"{_fmt(m('queue-ceiling', 'job_us'))} µs to its POST, 0.7 × allows "
                 f"{_fmt(m('queue-ceiling', 'budget_us'))} µs")
    inprocess = _median(results, "queue-inprocess", "-", f"{store}_mixed_jobs_per_s")
    if inprocess:
        text += f"; in process alone a job takes {_fmt(1e6 / inprocess)} µs"
    return text + ")"


def _hold_target(m) -> dict:
    ws, sse, every = m("hold", "ws"), m("hold", "sse"), m("hold", "every_event_everywhere")
    measured = f"{_fmt(ws)} WS + {_fmt(sse)} SSE, every event everywhere: {_fmt(every)}"
    met = None if ws is None else ws >= 9000 and sse >= 9000 and bool(every)
    return _check("hold 9,000 SSE + 9,000 WS, every event delivered", measured, met)


def _rss_target(m) -> dict:
    case = "hold" if m("hold", "rss_per_ws_kib") is not None else "paced"
    ws, sse = m(case, "rss_per_ws_kib"), m(case, "rss_per_sse_kib")
    met = None if ws is None else max(ws, sse) <= 12
    return _check("RSS per idle subscriber ≤ 12 KiB",
                  f"WS {_fmt(ws)} KiB, SSE {_fmt(sse)} KiB ({case})", met)


def _burst_targets(results: dict, m, n: int) -> list[dict]:
    cpu, peer = m(f"burst-{n}", "cpu_us_per_message"), m(f"burst-{n}", "cpu_us_per_message",
                                                        "peer")
    floor = _floor(results, n)
    return [
        _check(f"burst {n:,}: CPU/msg ≤ 2 × send() floor",
               f"{_fmt(cpu)} µs vs floor {_fmt(floor)} µs",
               None if cpu is None or not floor else cpu <= 2 * floor),
        _check(f"burst {n:,}: CPU/msg ≥ 8 × less than the h11 peer",
               f"{_fmt(cpu)} µs vs {_fmt(peer)} µs ({_ratio(peer, cpu)} ×)",
               None if cpu is None or not peer else peer >= 8 * cpu),
    ]


# -- chart ------------------------------------------------------------------------------

def _series(results: dict, variant: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for n, case in ((1000, "burst-1000"), (5000, "burst-5000"), (10000, "stats-10000")):
        value = _median(results, case, variant, key)
        if value is not None:
            xs.append(n)
            ys.append(value)
    return xs, ys


def chart(results: dict, path: Path) -> None:
    """CPU per message and latency against subscriber count, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cpu_ax, lat_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant in results["variants"]:
        cpu_ax.plot(*_series(results, variant, "cpu_us_per_message"), "o-", label=variant)
        for key, style in (("latency_p50_ms", "o-"), ("latency_p99_ms", "s--")):
            lat_ax.plot(*_series(results, variant, key), style,
                        label=f"{variant} {key.split('_')[1]}")
    floors = [(n, _floor(results, n)) for n in (1000, 5000, 10000)]
    floors = [(n, f) for n, f in floors if f is not None]
    if floors:
        cpu_ax.plot(*zip(*floors, strict=True), "k:", label="send() floor")
    _style(cpu_ax, "server CPU per delivered message (µs)")
    _style(lat_ax, "latency from emit time (ms)")
    fig.suptitle(f"Burst fan-out: rawjobs vs uvicorn + Starlette ({results['mode']} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _style(ax, ylabel: str) -> None:
    ax.set_xlabel("/ws/queue subscribers")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
