"""Requests and responses as handlers see them (RFC 9110 semantics, RFC 9112 wire).

A handler gets a ``Request`` and returns a ``Response``, or a ``Takeover`` that owns
the connection from then on (an SSE stream, a WebSocket).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

if TYPE_CHECKING:
    from .server import HTTPConnection

_ABSOLUTE_FORM = re.compile(r"https?://([^/?#]*)([^#]*)", re.IGNORECASE)
"""An absolute-form request target (RFC 9112 section 3.2.2): authority, then the
path and query (either may be empty)."""


@dataclass
class Request:
    """One HTTP request. ``headers`` are ``(name, value)`` byte pairs with lower-case
    names, as h11 gives them; ``path`` is the raw (still percent-encoded) path of the
    target; ``query`` maps each query parameter to its values; ``body`` is the whole
    body (bytes, at most the server's body limit). ``target`` is in origin-form
    (path and query); ``authority`` is the host of an absolute-form target, else
    None."""

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[bytes, bytes]]
    http_version: str = "1.1"
    body: bytes = b""
    client: tuple[str, int] | None = None
    path_params: dict[str, str] = field(default_factory=dict)
    authority: str | None = None

    @classmethod
    def from_target(cls, method: str, target: str, headers: list[tuple[bytes, bytes]],
                    http_version: str, client: tuple[str, int] | None) -> Request:
        """The request for a request-target as sent. An absolute-form target
        (``http://host:port/path?query``), which a server must accept (RFC 9112
        section 3.2.2), becomes its path and query (``/`` for an empty path) and
        keeps its authority apart."""
        authority = None
        if target[:1] != "/":
            absolute = _ABSOLUTE_FORM.fullmatch(target)
            if absolute is not None:
                authority, rest = absolute.groups()
                target = rest if rest[:1] == "/" else "/" + rest
        path, _, query = target.partition("?")
        return cls(method=method, target=target, path=path,
                   query=parse_qs(query, keep_blank_values=True) if query else {},
                   headers=headers, http_version=http_version, client=client,
                   authority=authority)

    def host(self) -> str | None:
        """The host the request is for: an absolute-form target's authority, which
        replaces the Host field (RFC 9112 section 3.2.2), else the Host field's
        value; None when there is neither (HTTP/1.0)."""
        return self.authority if self.authority is not None else self.header("host")

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded as Latin-1."""
        key = name.lower().encode("ascii")
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name``, comma-separated lists split and stripped."""
        key = name.lower().encode("ascii")
        out: list[str] = []
        for k, v in self.headers:
            if k == key:
                out.extend(p.strip() for p in v.decode("latin-1").split(","))
        return out

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class Response:
    """A complete response. ``headers`` are ``(name, value)`` string pairs; the
    server adds ``Date``, ``Server`` and ``Content-Length`` (unless ``known_length``
    is False: the head of a stream, answered to HEAD)."""

    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None
    known_length: bool = True


class Takeover(Protocol):
    """A handler result that takes over the connection after the request.

    ``serve`` writes its own response through ``conn`` and returns when done; the
    server then closes the connection."""

    async def serve(self, conn: HTTPConnection) -> None: ...


JSON_TYPE = "application/json"


_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON (no spaces, non-ASCII kept as is). Raises TypeError for
    what JSON cannot hold, ValueError for a cycle, UnicodeEncodeError for a lone
    surrogate."""
    return _encode(obj).encode("utf-8")


def json_response(obj: Any, status: int = 200, headers: list[tuple[str, str]] | None = None
                  ) -> Response:
    return Response(status=status, body=json_bytes(obj), headers=headers or [],
                    content_type=JSON_TYPE)


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None,
                   **fields: Any) -> Response:
    """``{"error": message, ...fields}`` with ``status`` (PROTOCOL.md conventions)."""
    return json_response({"error": message, **fields}, status=status, headers=headers)
