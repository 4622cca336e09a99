"""Jobs per second with 1, 2 and 3 rawjobs nodes on one PostgreSQL database.

Starts a private PostgreSQL (scripts/pgserver.py), then for each node count a fresh
database and that many ``python -m rawjobs`` processes with a no-op job type. Many
keep-alive clients post JOBS jobs, spread over the nodes; the figure is jobs created
and completed per second (first POST to the last completion, read from /api/stats).

    python bench/cluster_throughput.py [--jobs 3000] [--nodes 1 2 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from pgserver import create_database, private_postgres  # noqa: E402

NOOP_MODULE = '''
from rawjobs import job_type, JobContext

@job_type("noop", description="Does nothing")
async def noop(ctx: JobContext) -> dict:
    return {}
'''


def start_nodes(count: int, dsn: str, workdir: Path, concurrency: int) -> list[tuple]:
    nodes = []
    for i in range(count):
        port = 5400 + i
        proc = subprocess.Popen(
            [sys.executable, "-m", "rawjobs", "--port", str(port), "--db", dsn, "--jobs",
             "benchnoop", "--concurrency", str(concurrency), "--node-id", f"node{i}",
             "--log-level", "warning"],
            cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes.append((proc, f"http://127.0.0.1:{port}"))
    for _proc, url in nodes:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/api/stats", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.05)
    return nodes


async def post_all(urls: list[str], jobs: int, clients: int) -> None:
    body = {"job_type": "noop", "params": {}}
    per_client = jobs // clients

    async def client(i: int) -> None:
        async with httpx.AsyncClient(base_url=urls[i % len(urls)], timeout=60) as c:
            for _ in range(per_client):
                r = await c.post("/api/jobs", json=body)
                r.raise_for_status()

    await asyncio.gather(*(client(i) for i in range(clients)))


def wait_completed(url: str, jobs: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/api/stats", timeout=10).json()["queue"]["completed"] >= jobs:
            return
        time.sleep(0.05)
    raise TimeoutError("jobs did not complete in time")


def measure(server: str, count: int, jobs: int, clients: int, concurrency: int) -> dict:
    dsn = create_database(server, f"bench_{count}_{os.getpid()}")
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "benchnoop.py").write_text(NOOP_MODULE)
        nodes = start_nodes(count, dsn, Path(workdir), concurrency)
        try:
            urls = [url for _, url in nodes]
            started = time.perf_counter()
            asyncio.run(post_all(urls, jobs, clients))
            created = time.perf_counter()
            wait_completed(urls[0], jobs - jobs % clients)
            finished = time.perf_counter()
        finally:
            for proc, _ in nodes:
                proc.terminate()
            for proc, _ in nodes:
                proc.wait(20)
    done = jobs - jobs % clients
    return {"nodes": count, "jobs": done, "create_per_s": round(done / (created - started)),
            "jobs_per_s": round(done / (finished - started))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--clients", type=int, default=32, help="keep-alive HTTP clients")
    parser.add_argument("--concurrency", type=int, default=50, help="per node")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    results = []
    with private_postgres() as server:
        for count in args.nodes:
            results.append(measure(server, count, args.jobs, args.clients, args.concurrency))
            print(f"{count} node(s): {results[-1]['jobs_per_s']} jobs/s "
                  f"(created {results[-1]['create_per_s']}/s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
