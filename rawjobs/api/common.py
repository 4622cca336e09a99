"""What the REST, SSE and WebSocket handlers share: id parsing, JSON bodies, and the
mapping of core errors to HTTP responses."""

from __future__ import annotations

import json
import re
from typing import Any

from ..core.errors import Conflict, JobError, NotFound, QueueFull, ValidationError
from ..core.jobs import OPTION_NAMES
from ..web.http import Response, error_response, json_bytes

_ID_RE = re.compile(r"[0-9]{1,18}")
MAX_ID = 2**63 - 1


def parse_job_id(value: Any) -> int | None:
    """A job id from a path segment or a JSON value: a positive integer (or a
    string of ASCII digits); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value <= MAX_ID else None
    if isinstance(value, str) and _ID_RE.fullmatch(value):
        number = int(value)
        return number if number > 0 else None
    return None


class BadJSON(ValueError):
    """The text is not one JSON object."""


def _reject_constant(name: str) -> Any:
    raise BadJSON(f"Invalid JSON: {name} is not allowed")


def parse_json_object(text: bytes | str) -> dict[str, Any]:
    """Parse JSON text (bytes as ``json.loads`` reads them: UTF-8, -16 or -32) that
    must hold one object. Raises BadJSON with a client-safe message (NaN/Infinity,
    bad UTF-8, lone surrogates and deep nesting included)."""
    try:
        if isinstance(text, bytes | bytearray):
            text = text.decode(json.detect_encoding(text), "surrogatepass")
        value = _DECODER.decode(text)
    except BadJSON:
        raise
    except (ValueError, RecursionError):
        raise BadJSON("Invalid JSON") from None
    if not isinstance(value, dict):
        raise BadJSON("JSON body must be an object")
    if not _utf8_safe(text, value):
        raise BadJSON("Invalid JSON: strings must be valid Unicode (no lone surrogates)")
    return value


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _utf8_safe(text: str, value: Any) -> bool:
    """Whether ``value``, parsed from ``text``, holds no lone surrogate: one can come
    from the text itself (``surrogatepass``) or from a ``\\u`` escape."""
    if "\\u" in text:
        return is_utf8_encodable(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_utf8_encodable(value: Any) -> bool:
    """False if a string in ``value`` holds a lone UTF-16 surrogate (JSON's ``\\ud800``
    escapes decode to one), which no UTF-8 output could carry."""
    try:
        json_bytes(value)
    except UnicodeEncodeError:
        return False
    return True


_STATUS = {ValidationError: 400, NotFound: 404, Conflict: 409, QueueFull: 429}


def job_error_response(exc: JobError) -> Response:
    """The HTTP answer to a core error: its status, ``{"error", ...fields}`` and,
    for QueueFull, ``Retry-After``."""
    status = next((s for cls, s in _STATUS.items() if isinstance(exc, cls)), 400)
    headers = [("Retry-After", str(exc.retry_after))] if isinstance(exc, QueueFull) else []
    return error_response(status, exc.message, headers=headers, **exc.fields)


def job_options(body: dict[str, Any], idempotency_header: str | None = None) -> dict[str, Any]:
    """The job options of a create request (REST body or ``create_job`` message)."""
    options = {k: body[k] for k in OPTION_NAMES if k in body}
    if idempotency_header is not None:
        options["idempotency_key"] = idempotency_header
    return options
