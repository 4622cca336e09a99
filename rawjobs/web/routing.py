"""A route table you can read at a glance: method, path pattern, handler.

Patterns are literal segments and ``{name}`` placeholders matching one segment.
HEAD is served by the GET handler wherever GET is routed. A known path with the
wrong method gives 405 with ``Allow``; an unknown path is left to the fallback
(static files, then 404).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .http import Request, Response, Takeover, error_response

Handler = Callable[[Request], Awaitable["Response | Takeover"]]
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    pattern: str
    handler: Handler


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``/api/jobs/{id}`` -> a regex with a named group per placeholder."""
    regex = _PLACEHOLDER.sub(lambda m: f"(?P<{m.group(1)}>[^/]+)", re.escape(pattern)
                             .replace(r"\{", "{").replace(r"\}", "}"))
    return re.compile(f"^{regex}$")


def route(methods: str, pattern: str, handler: Handler) -> Route:
    """``route("GET POST", "/api/jobs", handler)``."""
    return Route(frozenset(methods.split()), pattern, handler)


class Router:
    """Dispatches a request to the resource (path pattern) its path matches.

    Literal patterns are tried before patterned ones, so ``/api/jobs/clear-completed``
    is its own resource and never reaches ``/api/jobs/{id}``. Several routes may
    share a pattern with different methods."""

    def __init__(self, routes: list[Route], fallback: Handler | None = None) -> None:
        resources: dict[str, dict[str, Handler]] = {}
        for r in routes:
            methods = resources.setdefault(r.pattern, {})
            for method in r.methods:
                methods[method] = r.handler
            if "GET" in r.methods:
                methods.setdefault("HEAD", r.handler)
        self._literal = {p: m for p, m in resources.items() if "{" not in p}
        self._resources = [(compile_pattern(p), m) for p, m in resources.items() if "{" in p]
        self._fallback = fallback

    async def dispatch(self, request: Request) -> Response | Takeover:
        methods = self._literal.get(request.path)
        if methods is not None:
            return await self._call(request, methods)
        for regex, methods in self._resources:
            match = regex.match(request.path)
            if match is not None:
                request.path_params = match.groupdict()
                return await self._call(request, methods)
        if self._fallback is not None:
            return await self._fallback(request)
        return error_response(404, "Not found")

    @staticmethod
    async def _call(request: Request, methods: dict[str, Handler]) -> Response | Takeover:
        handler = methods.get(request.method)
        if handler is None:
            return error_response(405, f"Method {request.method} not allowed",
                                  headers=[("Allow", ", ".join(sorted(methods)))])
        return await handler(request)
