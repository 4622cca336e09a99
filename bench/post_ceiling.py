"""Preload for the ``queue-ceiling`` case (bench/cases.py), loaded with
``bench/launch.py --preload bench.post_ceiling``: adds ``POST /api/bench/no-job``
to rawjobs.

The route reads a request as ``POST /api/jobs`` does, with the same code
(``read_create_request``: its Content-Type, its JSON body, its job options), and
answers ``201`` with a job object, encoded per request as a create's answer is. It
validates, stores, publishes and runs nothing: its rate on a server is the most jobs
per second that server could create over HTTP if a job cost nothing, the ceiling of
the "queue over HTTP" target.
"""

from __future__ import annotations

import time

from rawjobs.api import rest
from rawjobs.core.model import Job
from rawjobs.web.http import Request, Response, json_response
from rawjobs.web.routing import route

PATH = "/api/bench/no-job"
_JOB = Job(id=1, type="bench", params={"events": 0, "interval": 0.0, "gate": ""},
           created_at=time.time())


async def no_job(self: rest.RestAPI, request: Request) -> Response:
    read = rest.read_create_request(request)  # what a create reads, the same code
    if isinstance(read, Response):
        return read
    return json_response(_JOB.to_dict(), status=201, headers=[("Location", "/api/jobs/1")])


_routes = rest.RestAPI.routes


def _with_no_job(self: rest.RestAPI) -> list:
    return [*_routes(self), route("POST", PATH, self.no_job)]


rest.RestAPI.no_job = no_job  # type: ignore[attr-defined]
rest.RestAPI.routes = _with_no_job  # type: ignore[method-assign]
