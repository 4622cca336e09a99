"""The HTTP/1.1 server itself (issue 2, point 2), over raw sockets where a client library
would hide the wire: keep-alive, pipelining, Date and Server, malformed and oversized
requests, static files with ETag/304, and path traversal."""

from __future__ import annotations

import email.utils
import json
import socket
import time

import httpx
import pytest
from conftest import ROOT


@pytest.fixture(scope="module")
def server(start_module_server):
    """One default server (in-memory store, concurrency 3) for the whole module: these
    checks never depend on which jobs exist, and the server must survive them all."""
    return start_module_server()


class Conn:
    """One raw TCP connection to the server."""

    def __init__(self, port: int, timeout: float = 10) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError("closed before the end of the head")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("closed before the end of the body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Read one response: ``(status, headers with lower-case names, body)``."""
        status_line = self._line().decode("latin-1")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        code = int(status)
        if head_only or code in (204, 304) or 100 <= code < 200:
            return code, headers, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._exact(size)
                self._line()
            while self._line():  # trailers
                pass
            return code, headers, body
        return code, headers, self._exact(int(headers["content-length"]))

    def closed_by_server(self, timeout: float = 5) -> bool:
        """True if the server closes the connection (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def get(path: str, port: int, extra: str = "") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n").encode()


@pytest.fixture
def conn(server):
    c = Conn(server.port)
    yield c
    c.close()


# -- keep-alive, pipelining, standard headers ------------------------------------------------


def test_keep_alive_two_requests_on_one_socket(conn, server):
    for _ in range(2):
        conn.send(get("/api/stats", server.port))
        status, headers, body = conn.response()
        assert status == 200
        assert headers.get("connection", "").lower() != "close"
        assert json.loads(body)["worker"]["capacity"] == 3
    conn.send(get("/api/job-types", server.port))
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)[0]["name"] == "countdown"


def test_pipelined_requests_answered_in_order(conn, server):
    job = json.dumps({"job_type": "fibonacci", "params": {"count": 5}}).encode()
    conn.send(
        get("/api/stats", server.port)
        + get("/api/jobs/999", server.port)
        + (f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(job)}\r\n\r\n").encode()
        + job
        + f"HEAD /api/stats HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode()
        + get("/api/job-types", server.port)
    )
    status, _, body = conn.response()
    assert status == 200 and "queue" in json.loads(body)
    status, _, body = conn.response()
    assert status == 404 and json.loads(body)["error"] == "Job not found: 999"
    status, headers, body = conn.response()
    assert status == 201
    created = json.loads(body)
    assert created["params"] == {"count": 5}
    assert headers["location"] == f"/api/jobs/{created['id']}"
    status, headers, body = conn.response(head_only=True)
    assert status == 200 and body == b"" and headers["content-type"].startswith(
        "application/json")
    status, _, body = conn.response()
    assert status == 200 and [t["name"] for t in json.loads(body)][0] == "countdown"


@pytest.mark.parametrize("path", ["/api/stats", "/api/jobs/999", "/", "/nope"])
def test_date_and_server_headers(conn, server, path):
    conn.send(get(path, server.port))
    _, headers, _ = conn.response()
    assert headers.get("server"), headers
    date = email.utils.parsedate_to_datetime(headers["date"])
    assert date.tzinfo is not None and headers["date"].endswith("GMT")
    assert abs(date.timestamp() - time.time()) < 120


# -- requests the server must refuse ---------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nthis line has no colon\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
], ids=["garbage", "header-without-colon", "no-host", "bad-content-length", "nul-in-target"])
def test_malformed_request_400_connection_close(conn, raw):
    conn.send(raw)
    status, headers, body = conn.response()
    assert status == 400
    assert headers.get("connection", "").lower() == "close"
    assert isinstance(json.loads(body)["error"], str)
    assert conn.closed_by_server()


def test_oversized_head_is_431(conn, server):
    conn.send(get("/api/stats", server.port, "X-Big: " + "a" * 40_000 + "\r\n"))
    status, headers, _ = conn.response()
    assert status == 431
    assert headers.get("connection", "").lower() == "close"
    assert conn.closed_by_server()


def test_unsupported_transfer_coding_is_501(conn, server):
    conn.send(f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
              "Content-Type: application/json\r\nTransfer-Encoding: gzip\r\n\r\n".encode())
    status, headers, _ = conn.response()
    assert status == 501
    assert headers.get("connection", "").lower() == "close"
    assert conn.closed_by_server()


def test_server_still_serves_after_bad_requests(server):
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"):
        c = Conn(server.port)
        c.send(raw)
        assert c.response()[0] == 400
        c.close()
    assert httpx.get(server.url + "/api/stats").status_code == 200


# -- static files ------------------------------------------------------------------------------


@pytest.mark.parametrize("path, content_type, marker", [
    ("/", "text/html", b'id="job-list"'),
    ("/index.html", "text/html", b'id="job-list"'),
    ("/css/style.css", "text/css", b"{"),
    ("/js/app.js", "javascript", b"/ws/queue"),
])
def test_static_files_content_type_etag_and_304(client, path, content_type, marker):
    r = client.get(path)
    assert r.status_code == 200
    assert content_type in r.headers["content-type"], r.headers["content-type"]
    assert marker in r.content
    if path in ("/", "/index.html"):
        assert r.content.lstrip().lower().startswith(b"<!doctype html")
        assert r.content == (ROOT / "static" / "index.html").read_bytes()
    etag = r.headers["etag"]
    assert etag.startswith(('"', 'W/"')) and etag.endswith('"')

    again = client.get(path, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers.get("etag") == etag
    other = client.get(path, headers={"If-None-Match": '"not-the-etag"'})
    assert other.status_code == 200 and other.content == r.content


@pytest.mark.parametrize("path", [
    "/../pyproject.toml",
    "/%2e%2e/pyproject.toml",
    "/%2E%2E/pyproject.toml",
    "/css/../../pyproject.toml",
    "/css/%2e%2e/%2e%2e/pyproject.toml",
    "/..%2fpyproject.toml",
    "/%2e%2e%2fpyproject.toml",
    "/css/..%2f..%2fpyproject.toml",
    "/..\\pyproject.toml",
    "/%5c..%5cpyproject.toml",
    "//../pyproject.toml",
    "/static/../pyproject.toml",
    "/js/../../../../../../etc/passwd",
    "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/..%252fpyproject.toml",
])
def test_traversal_attempts_are_404(conn, server, path):
    assert (ROOT / "pyproject.toml").is_file()  # what a traversal would reach
    conn.send(get(path, server.port))
    status, _, body = conn.response()
    assert status == 404, (path, status)
    assert b"[project]" not in body and b"root:" not in body
    assert "error" in json.loads(body)
