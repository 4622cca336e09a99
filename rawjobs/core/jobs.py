"""Job types: the public API for defining them, their parameter schemas, validation.

A job type is a name, a description, a parameter schema and a handler. The schema is
the one ``GET /api/job-types`` returns (PROTOCOL.md, "Job types"); validation lives
here, once, and serves REST and WebSocket alike.

Example::

    from rawjobs import job_type, Param, JobContext

    @job_type("resize", description="Resize an image",
              params=[Param("width", int, default=640, min=1, max=8192)])
    async def resize(ctx: JobContext) -> dict:
        await ctx.progress(50, "halfway")
        return {"ok": True}
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import ValidationError
from .model import JobOptions

_MISSING: Any = object()
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_DIGITS_RE = re.compile(r"[0-9]{1,18}")
_TYPE_NAMES = {
    int: "integer", "integer": "integer", "int": "integer",
    float: "number", "number": "number", "float": "number",
    str: "string", "string": "string", "str": "string",
    bool: "boolean", "boolean": "boolean", "bool": "boolean",
    "choice": "choice",
}
EXECUTORS = ("async", "process")


class JobTypeError(ValueError):
    """A job type or parameter that cannot be registered (raised at import time)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


@dataclass(frozen=True)
class Param:
    """One parameter of a job type.

    ``type``: ``int``/``"integer"``, ``float``/``"number"``, ``str``/``"string"``,
    ``bool``/``"boolean"`` or ``"choice"`` (implied by ``choices``). ``min``/``max``
    bound numbers, ``min_length``/``max_length`` bound strings (in characters),
    ``choices`` lists the allowed values of a choice. Without ``default`` the parameter
    is required. Raises JobTypeError for an unknown type or inconsistent bounds.
    """

    name: str
    type: Any = int
    default: Any = _MISSING
    min: float | None = None
    max: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    choices: tuple[Any, ...] | None = None
    description: str = ""
    kind: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise JobTypeError(f"Invalid parameter name: {self.name!r}")
        kind = "choice" if self.choices is not None else _TYPE_NAMES.get(self.type)
        if kind is None:
            raise JobTypeError(f"Unknown type for parameter '{self.name}': {self.type!r}")
        object.__setattr__(self, "kind", kind)
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
            if not self.choices:
                raise JobTypeError(f"Parameter '{self.name}' has an empty choices list")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise JobTypeError(f"Parameter '{self.name}': min is greater than max")
        if self.default is not _MISSING:
            try:
                self.validate(self.default)
            except ValidationError as exc:
                raise JobTypeError(f"Bad default for parameter '{self.name}': {exc}") from None

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    def schema(self) -> dict[str, Any]:
        """The parameter as listed by ``GET /api/job-types``."""
        out: dict[str, Any] = {"name": self.name, "type": self.kind}
        if not self.required:
            out["default"] = self.default
        for key in ("min", "max", "min_length", "max_length"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.choices is not None:
            out["choices"] = list(self.choices)
        out["description"] = self.description
        return out

    def validate(self, value: Any) -> Any:
        """Return the normalised value, or raise ValidationError naming the parameter."""
        checker = getattr(self, f"_check_{self.kind}")
        return checker(value)

    def _fail(self, why: str) -> ValidationError:
        return ValidationError(f"Parameter '{self.name}' {why}", param=self.name)

    def _check_range(self, value: float) -> None:
        low, high = self.min, self.max
        if low is not None and high is not None and not low <= value <= high:
            raise self._fail(f"must be between {low} and {high}")
        if low is not None and value < low:
            raise self._fail(f"must be at least {low}")
        if high is not None and value > high:
            raise self._fail(f"must be at most {high}")

    def _check_integer(self, value: Any) -> int:
        if isinstance(value, str) and _DIGITS_RE.fullmatch(value):
            value = int(value)
        if not _is_int(value):
            raise self._fail("must be an integer")
        self._check_range(value)
        return value

    def _check_number(self, value: Any) -> float | int:
        if not _is_number(value):
            raise self._fail("must be a number")
        self._check_range(value)
        return value

    def _check_string(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self._fail("must be a string")
        if self.min_length is not None and len(value) < self.min_length:
            raise self._fail(f"must be at least {self.min_length} characters")
        if self.max_length is not None and len(value) > self.max_length:
            raise self._fail(f"must be at most {self.max_length} characters")
        return value

    def _check_boolean(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self._fail("must be true or false")
        return value

    def _check_choice(self, value: Any) -> Any:
        for choice in self.choices or ():
            if type(choice) is type(value) and choice == value:
                return value
        allowed = ", ".join(repr(c) for c in self.choices or ())
        raise self._fail(f"must be one of: {allowed}")


class JobContext:
    """What a handler gets: ``params``, ``job_id``, ``attempt`` (1 for the first run),
    ``progress(percent, message)`` and ``sleep(seconds)``.

    For ``async def`` handlers both are coroutines. In a process-pool handler they are
    plain calls (see rawjobs.core.procpool).
    """

    def __init__(
        self,
        job_id: int,
        params: dict[str, Any],
        attempt: int,
        report: Callable[[int, str], None],
    ) -> None:
        self.job_id = job_id
        self.params = params
        self.attempt = attempt
        self._report = report

    async def progress(self, percent: float, message: str = "") -> None:
        """Report progress: ``percent`` is clamped to an integer 0..100."""
        self._report(clamp_percent(percent), str(message))

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` without blocking the event loop; cancellable."""
        await asyncio.sleep(seconds)


def clamp_percent(percent: Any) -> int:
    try:
        value = int(percent)
    except (TypeError, ValueError, OverflowError):
        return 0
    return max(0, min(100, value))


@dataclass(frozen=True)
class JobType:
    """A registered job type. ``executor`` is "async" (runs on the event loop) or
    "process" (runs in the process pool). ``priority``, ``timeout`` (seconds) and
    ``max_attempts`` are the defaults for this type's jobs."""

    name: str
    handler: Callable[..., Any]
    description: str = ""
    params: tuple[Param, ...] = ()
    executor: str = "async"
    priority: int = 0
    timeout: float | None = None
    max_attempts: int = 1
    default_options: JobOptions = field(init=False, repr=False, compare=False)
    """The options of a job created without any: this type's defaults."""
    param_names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "default_options", JobOptions(
            priority=self.priority, timeout=self.timeout, max_attempts=self.max_attempts))
        object.__setattr__(self, "param_names", frozenset(p.name for p in self.params))

    def schema(self) -> dict[str, Any]:
        """The entry of ``GET /api/job-types`` (PROTOCOL.md), plus ``options``: this
        type's defaults for ``priority``, ``timeout`` (seconds or None) and
        ``max_attempts``."""
        return {
            "name": self.name,
            "description": self.description,
            "params": [p.schema() for p in self.params],
            "options": {"priority": self.priority, "timeout": self.timeout,
                        "max_attempts": self.max_attempts},
        }

    def validate_params(self, params: Any) -> dict[str, Any]:
        """Normalise ``params`` (a dict or None): defaults filled, strings of digits
        turned into integers. Raises ValidationError naming the parameter."""
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValidationError("params must be a JSON object", param="params")
        known = self.param_names
        for name in params:
            if name not in known:
                raise ValidationError(
                    f"Unknown parameter '{name}' for job type '{self.name}'", param=name
                )
        out: dict[str, Any] = {}
        for p in self.params:
            if p.name in params:
                out[p.name] = p.validate(params[p.name])
            elif p.required:
                raise ValidationError(f"Missing parameter '{p.name}'", param=p.name)
            else:
                out[p.name] = p.default
        return out


class Registry:
    """Job types by name, in registration order (the order of ``/api/job-types``)."""

    def __init__(self) -> None:
        self._types: dict[str, JobType] = {}

    def add(self, jt: JobType) -> JobType:
        if jt.name in self._types:
            raise JobTypeError(f"Duplicate job type name: '{jt.name}'")
        self._types[jt.name] = jt
        return jt

    def get(self, name: str) -> JobType | None:
        return self._types.get(name)

    def __iter__(self):
        return iter(self._types.values())

    def __len__(self) -> int:
        return len(self._types)

    def schemas(self) -> list[dict[str, Any]]:
        return [jt.schema() for jt in self._types.values()]

    def require(self, name: Any) -> JobType:
        """The job type called ``name``; ValidationError if missing or unknown."""
        if name is None or name == "":
            raise ValidationError("Missing job_type", param="job_type")
        if not isinstance(name, str):
            raise ValidationError("job_type must be a string", param="job_type")
        jt = self._types.get(name)
        if jt is None:
            raise ValidationError(f"Unknown job type: {name}", param="job_type")
        return jt


registry = Registry()
"""The default registry: ``@job_type`` adds to it; the server serves it."""


def job_type(
    name: str,
    *,
    description: str = "",
    params: Iterable[Param] = (),
    executor: str | None = None,
    priority: int = 0,
    timeout: float | None = None,
    max_attempts: int = 1,
    registry: Registry | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated handler as job type ``name``.

    An ``async def`` handler runs on the event loop; a plain ``def`` handler, or any
    handler with ``executor="process"``, runs in a worker process and must be a
    module-level function. Raises JobTypeError for a duplicate or invalid name,
    duplicate parameter names, an unknown executor or bad defaults.
    """

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        jt = make_job_type(
            name, handler, description=description, params=params, executor=executor,
            priority=priority, timeout=timeout, max_attempts=max_attempts,
        )
        (registry if registry is not None else globals()["registry"]).add(jt)
        return handler

    return decorate


def make_job_type(
    name: str,
    handler: Callable[..., Any],
    *,
    description: str = "",
    params: Iterable[Param] = (),
    executor: str | None = None,
    priority: int = 0,
    timeout: float | None = None,
    max_attempts: int = 1,
) -> JobType:
    """Build and check a JobType (see ``job_type``); raises JobTypeError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise JobTypeError(f"Invalid job type name: {name!r}")
    if not callable(handler):
        raise JobTypeError(f"Handler of job type '{name}' is not callable")
    params = tuple(params)
    for p in params:
        if not isinstance(p, Param):
            raise JobTypeError(f"Job type '{name}': params must be Param objects")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise JobTypeError(f"Job type '{name}' has duplicate parameter names")
    is_async = inspect.iscoroutinefunction(handler)
    executor = executor or ("async" if is_async else "process")
    if executor not in EXECUTORS:
        raise JobTypeError(f"Job type '{name}': unknown executor {executor!r}")
    if executor == "async" and not is_async:
        raise JobTypeError(f"Job type '{name}': executor 'async' needs an async def handler")
    if executor == "process" and "<locals>" in handler.__qualname__:
        raise JobTypeError(
            f"Job type '{name}': a process handler must be a module-level function"
        )
    defaults = {"priority": priority, "timeout": timeout, "max_attempts": max_attempts}
    try:
        validate_options(defaults)
    except ValidationError as exc:
        raise JobTypeError(f"Job type '{name}': {exc}") from None
    return JobType(
        name=name, handler=handler, description=description, params=params,
        executor=executor, priority=priority, timeout=timeout, max_attempts=max_attempts,
    )


_NO_OPTIONS = JobOptions()
OPTION_NAMES = ("priority", "delay", "run_at", "timeout", "max_attempts", "idempotency_key")
_MAX_DELAY = 365 * 86400.0


def _option_number(data: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise ValidationError(f"{name} must be a number between {low:g} and {high:g}", name)
    return value


def _option_int(data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, str) and _DIGITS_RE.fullmatch(value):
        value = int(value)
    if not _is_int(value) or not low <= value <= high:
        raise ValidationError(f"{name} must be an integer between {low} and {high}", name)
    return value


def validate_options(
    data: dict[str, Any], jt: JobType | None = None, now: float | None = None
) -> JobOptions:
    """Job options from a request body (issue 4). Missing options take the job type's
    defaults. ``delay`` (seconds) and ``run_at`` (Unix seconds) are exclusive.
    Raises ValidationError naming the option."""
    if not data:  # nothing asked: the defaults, built once (JobOptions is frozen)
        return jt.default_options if jt is not None else _NO_OPTIONS
    priority = _option_int(data, "priority", -1_000_000, 1_000_000)
    delay = _option_number(data, "delay", 0, _MAX_DELAY)
    run_at = _option_number(data, "run_at", 0, 1e11)
    timeout = _option_number(data, "timeout", 0.001, 7 * 86400)
    max_attempts = _option_int(data, "max_attempts", 1, 100)
    key = data.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200):
        raise ValidationError("idempotency_key must be a string of 1 to 200 characters",
                              "idempotency_key")
    if delay is not None and run_at is not None:
        raise ValidationError("Give either delay or run_at, not both", "delay")
    if delay:
        run_at = (time.time() if now is None else now) + delay
    return JobOptions(
        priority=priority if priority is not None else (jt.priority if jt else 0),
        run_at=run_at,
        timeout=timeout if timeout is not None else (jt.timeout if jt else None),
        max_attempts=max_attempts if max_attempts is not None else (jt.max_attempts if jt else 1),
        idempotency_key=key,
    )
