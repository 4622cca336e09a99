"""``GET /api/openapi.json``: an OpenAPI 3.1 description of the REST API of
PROTOCOL.md ("REST" and "Server-Sent Events"), as plain Python data.

It is what a fuzzer (schemathesis, tests/test_fuzz.py) checks the server against:
every status a route can answer is listed with its body's schema. Job objects may
carry fields added later (PROTOCOL.md: extra fields may be added), so objects allow
additional properties.
"""

from __future__ import annotations

from typing import Any

from ..web.http import JSON_TYPE, Request, Response, json_bytes

_STATUSES = ["pending", "running", "completed", "failed", "cancelled"]
_NUMBER_OR_NULL = {"type": ["number", "null"]}
_INTEGER_OR_NULL = {"type": ["integer", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str,
          headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _json(_ref("Error"), description, headers)


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                "schema": {"type": "string", "pattern": "^[0-9]+$"}}}
_LOCATION = {"Location": {"description": "The new job's URL",
                          "schema": {"type": "string"}}}
_TOO_LARGE = _error("Request body over the server's limit (--max-body-size)")
_ID_PARAM = {"name": "id", "in": "path", "required": True, "description": "Job id",
             "schema": {"type": "integer", "minimum": 1}}
_BAD_ID = _error("The id is not a positive integer")
_NOT_FOUND = _error("No job with that id")

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string"}, "param": {"type": "string"},
                       "job_id": {"type": "integer"}},
    },
    "Progress": {
        "type": "object", "required": ["percent", "message"],
        "properties": {"percent": {"type": "integer", "minimum": 0, "maximum": 100},
                       "message": {"type": "string"}},
    },
    "Job": {
        "type": "object",
        "required": ["id", "type", "params", "status", "progress", "result", "error",
                     "created_at", "started_at", "completed_at"],
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "type": {"type": "string"},
            "params": {"type": "object"},
            "status": {"enum": _STATUSES},
            "progress": _ref("Progress"),
            "result": {},
            "error": {"type": ["string", "null"]},
            "created_at": {"type": "number"},
            "started_at": _NUMBER_OR_NULL,
            "completed_at": _NUMBER_OR_NULL,
            "attempts": {"type": "integer", "minimum": 0},
            "priority": {"type": "integer"},
            "run_at": _NUMBER_OR_NULL,
            "timeout": _NUMBER_OR_NULL,
            "max_attempts": {"type": "integer", "minimum": 1},
            "retry_of": _INTEGER_OR_NULL,
        },
    },
    "NewJob": {
        "type": "object", "required": ["job_type"],
        "properties": {
            "job_type": {"type": "string",
                         "examples": ["countdown", "prime", "fibonacci", "echo"]},
            "params": {"type": "object"},
            "priority": {"type": "integer", "minimum": -1000000, "maximum": 1000000},
            "delay": {"type": "number", "minimum": 0, "maximum": 31536000},
            "run_at": {"type": "number", "minimum": 0, "maximum": 1e11},
            "timeout": {"type": "number", "minimum": 0.001, "maximum": 604800},
            "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
            "idempotency_key": {"type": "string", "minLength": 1, "maxLength": 200},
        },
    },
    "JobType": {
        "type": "object", "required": ["name", "description", "params"],
        "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                       "params": {"type": "array", "items": {"type": "object"}},
                       "options": {
                           "type": "object",
                           "description": "This type's defaults for the job options",
                           "properties": {
                               "priority": {"type": "integer"},
                               "timeout": {"type": ["number", "null"]},
                               "max_attempts": {"type": "integer"}}}},
    },
    "Stats": {
        "type": "object", "required": ["queue", "worker"],
        "properties": {
            "queue": {"type": "object",
                      "required": [*_STATUSES, "total"],
                      "additionalProperties": {"type": "integer"}},
            "worker": {"type": "object",
                       "required": ["active", "capacity", "processed", "is_running"],
                       "properties": {"active": {"type": "integer"},
                                      "capacity": {"type": "integer"},
                                      "processed": {"type": "integer"},
                                      "is_running": {"type": "boolean"}}},
        },
    },
}

_LIST_PARAMS = [
    {"name": "status", "in": "query", "schema": {"enum": _STATUSES}},
    {"name": "type", "in": "query", "schema": {"type": "string"}},
    {"name": "limit", "in": "query",
     "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1}},
]

PATHS: dict[str, Any] = {
    "/api/stats": {"get": {
        "operationId": "getStats", "summary": "Queue and worker counts",
        "responses": {"200": _json(_ref("Stats"), "The counts")},
    }},
    "/api/job-types": {"get": {
        "operationId": "listJobTypes", "summary": "The job types and their params",
        "responses": {"200": _json({"type": "array", "items": _ref("JobType")},
                                   "Job types, in a stable order")},
    }},
    "/api/jobs": {
        "get": {
            "operationId": "listJobs", "summary": "Jobs, newest first",
            "parameters": _LIST_PARAMS,
            "responses": {
                "200": _json({"type": "array", "items": _ref("Job")}, "A page of jobs",
                             {"Link": {"description": 'rel="next" when more remain',
                                       "schema": {"type": "string"}}}),
                "400": _error("A bad query parameter"),
            },
        },
        "post": {
            "operationId": "createJob", "summary": "Create a job",
            "parameters": [{"name": "Idempotency-Key", "in": "header",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200}}],
            "requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref("NewJob")}}},
            "responses": {
                "201": _json(_ref("Job"), "Created", _LOCATION),
                "200": _json(_ref("Job"), "An idempotent repeat: the existing job", _LOCATION),
                "400": _error("Invalid JSON, unknown job type or bad params or options"),
                "409": _error("Idempotency key already used with a different request"),
                "413": _TOO_LARGE,
                "415": _error("Content-Type is not application/json"),
                "429": _error("Too many pending jobs (--max-pending)", _RETRY_AFTER),
            },
        },
    },
    "/api/jobs/clear-completed": {"post": {
        "operationId": "clearCompleted", "summary": "Delete every finished job",
        "responses": {"200": _json({"type": "object", "required": ["cleared"],
                                    "properties": {"cleared": {"type": "integer",
                                                               "minimum": 0}}},
                                   "How many were deleted")},
    }},
    "/api/jobs/{id}": {
        "parameters": [_ID_PARAM],
        "get": {
            "operationId": "getJob", "summary": "One job",
            "responses": {"200": _json(_ref("Job"), "The job"), "400": _BAD_ID,
                          "404": _NOT_FOUND},
        },
        "delete": {
            "operationId": "cancelJob", "summary": "Cancel a pending or running job",
            "responses": {
                "200": _json({"type": "object", "required": ["success", "job_id"],
                              "properties": {"success": {"const": True},
                                             "job_id": {"type": "integer"}}}, "Cancelled"),
                "400": _BAD_ID, "404": _NOT_FOUND,
                "409": _error("The job has already finished"),
            },
        },
    },
    "/api/jobs/{id}/retry": {
        "parameters": [_ID_PARAM],
        "post": {
            "operationId": "retryJob", "summary": "A new job like a failed or cancelled one",
            "responses": {
                "201": _json(_ref("Job"), "The new job", _LOCATION),
                "400": _BAD_ID, "404": _NOT_FOUND,
                "409": _error("The job is not failed or cancelled"),
                "429": _error("Too many pending jobs (--max-pending)", _RETRY_AFTER),
            },
        },
    },
    "/api/jobs/{id}/progress": {
        "parameters": [_ID_PARAM],
        "get": {
            "operationId": "jobProgress",
            "summary": "The job's progress as Server-Sent Events (status, progress..., "
                       "then complete, failed or cancelled)",
            "parameters": [{"name": "Last-Event-ID", "in": "header",
                            "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "An event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                "204": {"description": "Last-Event-ID is at or past the terminal event"},
                "400": _BAD_ID, "404": _NOT_FOUND,
            },
        },
    },
    "/api/openapi.json": {"get": {
        "operationId": "getOpenAPI", "summary": "This document",
        "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
    }},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "rawjobs", "version": "1",
             "description": "The REST API of a rawjobs server (PROTOCOL.md). With "
                            "--token every /api request needs 'Authorization: Bearer "
                            "<token>' or '?token=<token>', else 401."},
    "paths": PATHS,
    "components": {"schemas": SCHEMAS},
}


_BODY = json_bytes(DOCUMENT)  # the document never changes: encoded once


async def serve_openapi(request: Request) -> Response:
    """``GET /api/openapi.json``: 200 with ``DOCUMENT`` as JSON."""
    return Response(body=_BODY, content_type=JSON_TYPE)
