"""Issue 5, points 6 and 7: who may talk to the server (Host check, token, the
exposure warning) and what a client never sees (exception text, files outside
static/)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ServerProcess, free_port, wait_ready
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

TOKEN = "s3cret-token"


def raw_get(port: int, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """``GET target`` exactly as given (no client-side normalisation)."""
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode("latin-1"))
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    status = int(re.match(rb"HTTP/1\.1 (\d{3}) ", out).group(1))
    return status, out.partition(b"\r\n\r\n")[2]


# -- 6. Host ------------------------------------------------------------------------------------


def test_host_header_must_name_this_server(start_server):
    server = start_server("--allowed-host", "jobs.internal")
    port = server.port
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST",
                 f"[::1]:{port}", "jobs.internal", f"jobs.internal:{port}"):
        assert raw_get(port, "/api/stats", host)[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                 "localhost.evil.example", "[::2]", "jobs.internal.evil.example"):
        status, body = raw_get(port, "/api/stats", host)
        assert status == 400 and json.loads(body) == {"error": "Host not allowed"}, host
    assert raw_get(port, "/", "evil.example")[0] == 400  # the dashboard too
    assert raw_get(port, "/ws/queue", "evil.example")[0] == 400
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /api/stats HTTP/1.1\r\n\r\n")  # HTTP/1.1 needs a Host
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")


def test_absolute_form_target_is_served_by_its_authority(start_server):
    """RFC 9112 section 3.2.2: a server must accept an absolute-form target, and
    then use its authority in place of the Host field."""
    port = start_server().port
    status, body = raw_get(port, f"http://127.0.0.1:{port}/api/stats", "evil.example")
    assert status == 200 and "queue" in json.loads(body)
    status, body = raw_get(port, f"HTTP://LOCALHOST:{port}/api/jobs?limit=1")
    assert status == 200 and json.loads(body) == []
    assert raw_get(port, f"http://127.0.0.1:{port}")[0] == 200  # empty path: "/"
    assert raw_get(port, f"http://127.0.0.1:{port}/api/nope")[0] == 404
    for target in ("http://evil.example/api/stats", f"http://user@127.0.0.1:{port}/",
                   "http:///api/stats"):
        status, body = raw_get(port, target)
        assert status == 400 and json.loads(body) == {"error": "Host not allowed"}, target


# -- 6. token -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["option", "environment"])
async def test_token_guards_api_and_ws(start_server, how):
    if how == "option":
        server = start_server("--token", TOKEN, "--grace", "0", ready=False)
    else:
        server = start_server("--grace", "0", env={"RAWJOBS_TOKEN": TOKEN}, ready=False)
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        await _wait_up(client)
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/api/stats", "/api/jobs", "/api/job-types", "/api/openapi.json"):
            r = await client.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert "error" in r.json()
            assert (await client.get(path, headers={"Authorization": "Bearer wrong"})
                    ).status_code == 401
            assert (await client.get(path, headers=bearer)).status_code == 200
            assert (await client.get(path, params={"token": TOKEN})).status_code == 200
        created = await client.post("/api/jobs", json={"job_type": "echo"}, headers=bearer)
        assert created.status_code == 201
        progress = f"/api/jobs/{created.json()['id']}/progress"
        assert (await client.get(progress)).status_code == 401
        async with client.stream("GET", progress, params={"token": TOKEN}) as r:
            assert r.status_code == 200
        assert (await client.get("/")).status_code == 200  # the page asks for the token
    with pytest.raises(InvalidStatus) as refused:
        await ws_connect(server.ws_url)
    assert refused.value.response.status_code == 401
    async with ws_connect(server.ws_url + f"?token={TOKEN}") as ws:
        assert json.loads(await ws.recv())["type"] == "queue_state"
    async with ws_connect(server.ws_url, additional_headers=bearer) as ws:
        assert json.loads(await ws.recv())["type"] == "queue_state"
    assert "without --token" not in server.log()


async def _wait_up(client: httpx.AsyncClient) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            await client.get("/")
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "server did not start"
            await asyncio.sleep(0.05)


def _wait_for_log(server, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert server.proc.poll() is None, server.log()
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    return server.log()


def test_exposed_without_token_is_warned(start_server):
    # bound to every interface for about a second; traffic stays on 127.0.0.1
    exposed = start_server("--host", "0.0.0.0", ready=False)
    log = _wait_for_log(exposed, "dashboard at")
    exposed.terminate()
    assert "WARNING" in log and "without --token" in log
    guarded = start_server("--host", "0.0.0.0", "--token", TOKEN, ready=False)
    log = _wait_for_log(guarded, "dashboard at")
    guarded.terminate()
    assert "without --token" not in log
    local = start_server()
    assert "without --token" not in local.log()


# -- 7. errors --------------------------------------------------------------------------------

BROKEN_JOBS = '''
from rawjobs import job_type

@job_type("broken", description=b"SECRET-DETAIL")  # not JSON-serialisable: a plugin bug
async def broken(ctx):
    return None
'''


async def test_handler_bug_reveals_nothing(start_server, tmp_path):
    (tmp_path / "broken_jobs.py").write_text(BROKEN_JOBS)
    server = start_server("--jobs", "broken_jobs")
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        r = await client.get("/api/job-types")
        assert r.status_code == 500
        assert r.content == b'{"error":"Internal server error"}'
        assert (await client.get("/api/stats")).status_code == 200  # still serving
    async with ws_connect(server.ws_url) as ws:  # queue_state lists the job types
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
    assert ws.protocol.close_rcvd.code == 1011
    assert ws.protocol.close_rcvd.reason == "Internal error"
    log = server.log()
    assert log.count("Traceback") >= 2 and "bytes is not JSON serializable" in log


# -- 7. static files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def static_server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("static")
    root = tmp_path / "site"
    (root / "css").mkdir(parents=True)
    (root / "index.html").write_text("<h1>home</h1>")
    (root / "css" / "style.css").write_text("body {}")
    (tmp_path / "secret.txt").write_text("TOP-SECRET")
    (root / "inside-link.html").symlink_to(root / "index.html")
    (root / "out-link.txt").symlink_to(tmp_path / "secret.txt")
    (root / "out-dir").symlink_to(tmp_path)
    port = free_port()
    log_path = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rawjobs", "--port", str(port), "--db", ":memory:",
         "--static-dir", str(root)],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        cwd=str(tmp_path),
    )
    server = ServerProcess(proc, port, log_path)
    wait_ready(server.url, proc)
    yield server
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("target", [
    "/../secret.txt",
    "/css/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E%2Fsecret.txt",
    "/css/..%2f..%2fsecret.txt",
    "/.%2e/secret.txt",
    "/..%5csecret.txt",
    "/css\\..\\..\\secret.txt",
    "/%5c..%5csecret.txt",
    "/index.html%00.txt",
    "/%00",
    "/%ff%fe",
    "//etc/passwd",
    "/%2fetc%2fpasswd",
    "/../../../../../../etc/passwd",
    "/out-link.txt",
    "/out-dir/secret.txt",
    "/..%252fsecret.txt",
    "http://127.0.0.1/../secret.txt",
])
def test_static_traversal_is_404(static_server, target):
    status, body = raw_get(static_server.port, target)
    assert status == 404
    assert b"TOP-SECRET" not in body and b"root:" not in body


def test_static_files_inside_are_served(static_server):
    assert raw_get(static_server.port, "/") == (200, b"<h1>home</h1>")
    assert raw_get(static_server.port, "/css/style.css") == (200, b"body {}")
    assert raw_get(static_server.port, "/inside-link.html") == (200, b"<h1>home</h1>")
    # a symlink leading out and back in names a file inside: served
    assert raw_get(static_server.port, "/out-dir/site/index.html") == (200, b"<h1>home</h1>")
