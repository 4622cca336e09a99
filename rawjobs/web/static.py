"""Static files from one folder, with ETag revalidation (RFC 9110 sections 8.8.3,
13.1.2) and no way out of the folder: decoded ``..``, backslashes, NUL bytes and
symlinks that lead outside all answer 404."""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from urllib.parse import unquote

from .http import Request, Response, error_response

_TEXT_TYPES = ("text/", "application/javascript", "application/json", "image/svg+xml")


class StaticFiles:
    """Serves files under ``root``; ``/`` is ``index.html``. Contents are cached in
    memory and re-read when the file's size or modification time changes."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self._cache: dict[Path, tuple[tuple[int, int], str, bytes]] = {}

    def resolve(self, raw_path: str) -> Path | None:
        """The file a request path names, or None if it names nothing we serve."""
        path = unquote(raw_path, errors="strict") if "%" in raw_path else raw_path
        if "\x00" in path or "\\" in path or not path.startswith("/"):
            return None
        parts = [p for p in path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            return None
        if not parts:
            parts = ["index.html"]
        try:
            candidate = self.root.joinpath(*parts).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return None
        if not candidate.is_relative_to(self.root) or not candidate.is_file():
            return None
        return candidate

    async def __call__(self, request: Request) -> Response:
        try:
            path = self.resolve(request.path)
        except UnicodeDecodeError:
            path = None
        if path is None:
            return error_response(404, "Not found")
        if request.method not in ("GET", "HEAD"):
            return error_response(405, f"Method {request.method} not allowed",
                                  headers=[("Allow", "GET, HEAD")])
        etag, content_type, body = self._load(path)
        headers = [("ETag", etag), ("Cache-Control", "no-cache")]
        if _matches(request.header("if-none-match"), etag):
            return Response(status=304, headers=headers)
        return Response(status=200, body=body, headers=headers, content_type=content_type)

    def _load(self, path: Path) -> tuple[str, str, bytes]:
        st = path.stat()
        key = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != key:
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if content_type.startswith(_TEXT_TYPES):
                content_type += "; charset=utf-8"
            cached = (key, content_type, path.read_bytes())
            self._cache[path] = cached
        etag = f'"{key[0]:x}-{key[1]:x}"'
        return etag, cached[1], cached[2]


def _matches(if_none_match: str | None, etag: str) -> bool:
    if if_none_match is None:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or etag in tags or f"W/{etag}" in tags
