"""What the benchmark cases are built from: servers started fresh (with the fd limit
raised to the hard one), load-client processes driven over a pipe, CPU and RSS read
from /proc, a GET /api/stats prober, and wrk."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TICK = os.sysconf("SC_CLK_TCK")
WORK = Path(tempfile.mkdtemp(prefix="rawjobs-bench-"))
MAX_PER_CLIENT = 9_500  # subscribers per load-client process (fd limit 20,000)
PROFILE: dict = {"dir": None}  # set by run.py --profile: py-spy records every server
FANOUT_PROBE: dict = {"on": False}  # set by run.py --fanout-probe (bench/fanout_probe.py)
CLIENT_LOOP = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
"""The load client's event loop: uvloop when installed (the client reads faster, so
less of what is measured is the client), the same for every server."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    """preexec_fn: ``ulimit -n`` at the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- /proc ---------------------------------------------------------------------------

def proc_times(pid: int) -> list[int]:
    """utime, stime, cutime, cstime of ``pid`` in clock ticks (/proc/PID/stat 14-17)."""
    with open(f"/proc/{pid}/stat") as f:
        return [int(v) for v in f.read().rsplit(")", 1)[1].split()[11:15]]


def proc_cpu(pid: int, children: bool = False) -> float:
    """User + system CPU seconds of ``pid``, plus those of its ended and reaped
    children if ``children``."""
    times = proc_times(pid)
    return sum(times if children else times[:2]) / TICK


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_busy() -> float:
    """CPU seconds used on the whole machine (all but idle and iowait)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / TICK


class CpuWindow:
    """CPU used between construction and ``stop`` by the server, by the other known
    processes (load clients; this one and its reaped children, e.g. wrk) and by
    everything else on the machine.
    A run is *disturbed* when the rest used more than ``limit`` of one core."""

    def __init__(self, server: int, known: list[int], limit: float = 0.15) -> None:
        self.server, self.known, self.limit = server, known, limit
        self.start = self._sample()

    def _sample(self) -> tuple[float, ...]:
        known = sum(_cpu_or_zero(pid) for pid in self.known) + proc_cpu(os.getpid(), True)
        user, system = (t / TICK for t in proc_times(self.server)[:2])
        return time.perf_counter(), machine_busy(), user + system, system, known

    def stop(self) -> dict:
        end = self._sample()
        wall, machine, server, system, known = (b - a for a, b in zip(self.start, end,
                                                                      strict=True))
        other = max(0.0, machine - server - known)
        return {"wall_s": wall, "server_cpu_s": server, "server_system_s": system,
                "client_cpu_s": known,
                "other_cpu_s": other, "other_pct": 100 * other / wall if wall else 0.0,
                "disturbed": wall > 0 and other / wall > self.limit}


def wait_for_quiet(max_wait: float, limit: float = 0.10, sample: float = 0.5) -> float:
    """Wait (up to ``max_wait`` seconds) until the machine used less than ``limit``
    of one core over ``sample`` seconds (other processes off the CPU); returns the
    seconds waited."""
    started = time.perf_counter()
    while True:
        before = machine_busy() - proc_cpu(os.getpid(), True)
        time.sleep(sample)
        busy = machine_busy() - proc_cpu(os.getpid(), True) - before
        waited = time.perf_counter() - started
        if busy / sample < limit or waited >= max_wait:
            return waited


def _cpu_or_zero(pid: int) -> float:
    try:
        return proc_cpu(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


# -- servers -------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A server to measure: ``kind`` rawjobs or peer, on ``loop`` asyncio or uvloop."""

    kind: str
    loop: str = "asyncio"

    @property
    def name(self) -> str:
        return self.kind if self.loop == "asyncio" else f"{self.kind}+uvloop"


def server_command(variant: Variant, port: int, concurrency: int, db: str) -> list[str]:
    if variant.kind == "rawjobs":
        return [sys.executable, str(BENCH / "launch.py"), "--loop", variant.loop, "--",
                "--port", str(port), "--db", db, "--jobs", "bench.jobs",
                "--concurrency", str(concurrency), "--max-connections", "20000",
                "--log-level", "warning"]
    stack = (["--http", "h11", "--ws", "wsproto", "--loop", "asyncio"]
             if variant.loop == "asyncio" else
             ["--http", "httptools", "--ws", "websockets", "--loop", "uvloop"])
    return [sys.executable, "-m", "uvicorn", "bench.peer.app:app", "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log", "--log-level", "warning",
            "--backlog", "4096", *stack]


class Server:
    """A fresh server process (context manager): ``port``, ``pid``, ``cpu()``, ``rss()``."""

    def __init__(self, variant: Variant, concurrency: int = 10, db: str = ":memory:",
                 preload: str = "") -> None:
        """``preload``: a module rawjobs imports first (bench/launch.py --preload)."""
        self.variant = variant
        self.port = free_port()
        self.log = WORK / f"{variant.name}-{self.port}.log"
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, BENCH_PEER_CONCURRENCY=str(concurrency), PYTHONPATH=path)
        self.fanout_log: Path | None = None
        preloads = [env.get("BENCH_RAWJOBS_PRELOAD"), preload]
        if FANOUT_PROBE["on"] and variant.kind == "rawjobs":
            self.fanout_log = WORK / f"fanout-{self.port}.jsonl"
            env["BENCH_FANOUT_PROBE"] = str(self.fanout_log)
            preloads.append("bench.fanout_probe")
        env["BENCH_RAWJOBS_PRELOAD"] = ",".join(filter(None, preloads))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                server_command(variant, self.port, concurrency, db), cwd=ROOT, env=env,
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
        self.pid = self.proc.pid
        self.profiler: subprocess.Popen | None = None
        self._wait_ready()
        if PROFILE["dir"] is not None:
            self._start_profiler(Path(PROFILE["dir"]))

    def _start_profiler(self, directory: Path) -> None:
        """py-spy record (raw collapsed stacks, 250 Hz; pausing the server per sample keeps stacks whole)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.profile = directory / f"{self.variant.name}-{self.port}.txt"
        self.profiler = subprocess.Popen(
            ["py-spy", "record", "--pid", str(self.pid), "--rate", "250",
             "--format", "raw", "-o", str(self.profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if Http(self.port).request("GET", "/api/stats")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.variant.name} did not start: {self.log.read_text()[-2000:]}")

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def rss(self) -> int:
        return proc_rss_kib(self.pid)

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)
            self.profiler.wait(30)
            self.profiler = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- HTTP --------------------------------------------------------------------------

class Http:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def close(self) -> None:
        self.conn.close()


def create_jobs(port: int, count: int, params: dict) -> list[int]:
    """POST ``count`` bench jobs back to back on one keep-alive connection."""
    http = Http(port)
    ids = []
    for _ in range(count):
        status, job = http.request("POST", "/api/jobs", {"job_type": "bench", "params": params})
        if status != 201:
            raise RuntimeError(f"POST /api/jobs: {status} {job}")
        ids.append(job["id"])
    http.close()
    return ids


class StatsProber(threading.Thread):
    """GET /api/stats in a loop (one keep-alive connection, ``pause`` seconds apart)
    until ``stop``; ``latencies`` in seconds."""

    def __init__(self, port: int, pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.port, self.pause = port, pause
        self.latencies: list[float] = []
        self._halt = threading.Event()

    def run(self) -> None:
        http = Http(self.port)
        while not self._halt.is_set():
            started = time.perf_counter()
            http.request("GET", "/api/stats")
            self.latencies.append(time.perf_counter() - started)
            self._halt.wait(self.pause)
        http.close()

    def stop(self) -> dict:
        self._halt.set()
        self.join(60)
        return percentiles_ms(np.array(self.latencies))


def wrk(port: int, path: str, seconds: float, connections: int,
        script: Path | None = None) -> dict:
    """Run ``wrk -t1 -cCONNECTIONS -dSECONDS`` and parse its report."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    if script is not None:
        command += ["-s", str(script)]
    proc = subprocess.Popen([*command, f"http://127.0.0.1:{port}{path}"],
                            stdout=subprocess.PIPE, text=True)
    return parse_wrk(proc.communicate()[0])


def parse_wrk(out: str) -> dict:
    def number(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else 0.0

    return {"req_per_s": number(r"Requests/sec:\s+([\d.]+)"),
            "requests": number(r"(\d+) requests in"),
            "non_2xx": number(r"Non-2xx or 3xx responses:\s+(\d+)"),
            "socket_errors": len(re.findall(r"Socket errors", out))}


# -- load clients ------------------------------------------------------------------

class Clients:
    """Load-client processes (bench/loadclient.py --control), ``ws`` WebSocket and
    ``sse`` SSE subscribers split over as many processes as the fd limit needs."""

    def __init__(self, port: int, ws: int = 0, sse: int = 0,
                 sse_path: str = "/api/jobs/1/progress", loop: str = CLIENT_LOOP) -> None:
        total = ws + sse
        parts = max(1, -(-total // MAX_PER_CLIENT))
        self.procs = [self._spawn(port, _share(ws, parts, i), _share(sse, parts, i),
                                  sse_path, loop) for i in range(parts)]
        self.pids = [p.pid for p in self.procs]
        self.ws, self.sse = ws, sse
        self.expected = ws + sse

    @staticmethod
    def _spawn(port: int, ws: int, sse: int, sse_path: str, loop: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, str(BENCH / "loadclient.py"), "--control", "--port", str(port),
             "--ws", str(ws), "--sse", str(sse), "--sse-path", sse_path, "--loop", loop],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=raise_fd_limit)
        json.loads(proc.stdout.readline())  # {"ready": true}
        return proc

    def call(self, command: str) -> list[dict]:
        for proc in self.procs:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        return [json.loads(proc.stdout.readline()) for proc in self.procs]

    def connect(self, kind: str = "") -> dict:
        """Connect every subscriber not connected yet, or those of ``kind``."""
        answers = self.call(f"connect {kind}".strip())
        connected = sum(a["connected"] for a in answers)
        return {"connected": connected, "failed": sum(a["failed"] for a in answers),
                "wall_s": max(a["wall_s"] for a in answers),
                "p50_ms": max(a["connect_ms"]["p50"] for a in answers),
                "p99_ms": max(a["connect_ms"]["p99"] for a in answers),
                "errors": [a["errors"] for a in answers if a["errors"]]}

    def reset(self) -> None:
        """Zero the counters and drop the recorded pairs."""
        self.call("reset")

    def count(self) -> dict:
        answers = self.call("count")
        out = {"messages": sum(a["messages"] for a in answers),
               "marked": sum(a["marked"] for a in answers), "lost": {}}
        for a in answers:
            for k, v in a["lost"].items():
                out["lost"][k] = out["lost"].get(k, 0) + v
        out["marked_min"] = _merge(answers, "marked_min", min)
        out["marked_max"] = _merge(answers, "marked_max", max)
        return out

    def wait_for(self, messages: int, timeout: float, quiet: float = 3.0,
                 marked: int = 0) -> dict:
        """Poll until ``messages`` have arrived, ``marked`` of them with an emit time,
        or nothing arrived for ``quiet`` seconds, or ``timeout``; returns the last
        count plus ``wait_s``."""
        started = last_change = time.perf_counter()
        last = -1
        while True:
            counts = self.count()
            now = time.perf_counter()
            arrived = counts["messages"] >= messages and counts["marked"] >= marked
            if arrived or now - started > timeout or now - last_change > quiet:
                counts["wait_s"] = now - started
                return counts
            if counts["messages"] != last:
                last, last_change = counts["messages"], now
            time.sleep(0.05)

    def pairs(self, kind: str = "") -> np.ndarray:
        """All (emit, receive) pairs, or those of ``kind`` ("ws", "sse"), shape (n, 2)."""
        arrays = []
        for i, proc in enumerate(self.procs):
            path = WORK / f"pairs-{proc.pid}-{i}.bin"
            proc.stdin.write(f"dump {path} {kind}\n")
            proc.stdin.flush()
            json.loads(proc.stdout.readline())
            arrays.append(np.fromfile(path, dtype=np.float64))
            path.unlink()
        return np.concatenate(arrays).reshape(-1, 2)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.stdin.write("close\n")
                    proc.stdin.flush()
                    proc.stdout.readline()
                except (BrokenPipeError, OSError):
                    pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def __enter__(self) -> Clients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _merge(answers: list[dict], key: str, pick) -> dict:
    out: dict = {}
    for a in answers:
        for kind, value in a[key].items():
            out[kind] = value if kind not in out else pick(out[kind], value)
    return out


# -- statistics ----------------------------------------------------------------------

def percentiles_ms(seconds: np.ndarray) -> dict:
    if seconds.size == 0:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(seconds, [50, 99]) * 1000
    return {"n": int(seconds.size), "p50": float(p50), "p99": float(p99),
            "max": float(seconds.max() * 1000)}


def latency(pairs: np.ndarray) -> dict:
    """Per (subscriber, event) latency from the emit time, in ms."""
    return percentiles_ms(pairs[:, 1] - pairs[:, 0]) if len(pairs) else percentiles_ms(
        np.array([]))


def fanout_windows(log: Path, pairs: np.ndarray, within: float) -> dict:
    """Split each event's spread with the server's own timestamps (bench/fanout_probe.py):
    ``write``, the server's first write of the event (any channel) to its last one,
    of which ``write_cpu`` on a CPU and ``write_waiting`` runnable but waiting for
    one; ``after``, the last subscriber's receive time minus that last write (the
    kernel and the load client; slightly negative when that subscriber read it
    before the server had read its clocks after the write). An event's writes are the broadcasts asked for
    within ``within`` seconds after its emit time. Percentiles in ms over the events."""
    records = [json.loads(line) for line in log.read_text().splitlines()] \
        if log.exists() else []
    out: dict[str, list[float]] = {"write": [], "write_cpu": [], "write_waiting": [],
                                   "after": []}
    for emit in np.unique(pairs[:, 0]) if len(pairs) else []:
        mine = [r for r in records if emit <= r["asked"] < emit + within]
        if mine:
            first = min(mine, key=lambda r: r["first"])
            last = max(mine, key=lambda r: r["last"])
            out["write"].append(last["last"] - first["first"])
            out["write_cpu"].append(last["cpu_last"] - first["cpu_first"])
            out["write_waiting"].append(last["wait_last"] - first["wait_first"])
            out["after"].append(pairs[pairs[:, 0] == emit, 1].max() - last["last"])
    return {k: percentiles_ms(np.array(v)) for k, v in out.items()}


def spreads(pairs: np.ndarray) -> dict:
    """Per event (one emit time): first-to-last receive spread across subscribers, ms."""
    if not len(pairs):
        return percentiles_ms(np.array([]))
    order = np.argsort(pairs[:, 0], kind="stable")
    emit, received = pairs[order, 0], pairs[order, 1]
    starts = np.flatnonzero(np.r_[True, np.diff(emit) != 0])
    spread = np.maximum.reduceat(received, starts) - np.minimum.reduceat(received, starts)
    return percentiles_ms(spread)
