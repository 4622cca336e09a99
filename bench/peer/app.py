"""The peer: the subset of the rawjobs protocol the benchmarks use, written the
conventional way on Starlette (one ``asyncio.Queue`` per subscriber, a writer per
subscriber, ``json.dumps`` per send). Run it as::

    uvicorn bench.peer.app:app --http h11 --ws wsproto --no-access-log

Routes: ``GET /api/stats``, ``POST /api/jobs`` (the ``bench`` job type only),
``GET /api/jobs/{id}/progress`` (SSE) and ``/ws/queue`` (WebSocket: ``queue_state`` on
connect, then every broadcast ``{"type", "data", "seq"}``). Jobs live in memory and
run on ``BENCH_PEER_CONCURRENCY`` worker tasks (default 10).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .state import TERMINAL, JobError, Runner

runner = Runner(concurrency=int(os.environ.get("BENCH_PEER_CONCURRENCY", "10")))


async def stats(request: Request) -> Response:
    return JSONResponse(runner.stats())


async def create_job(request: Request) -> Response:
    try:
        body = await request.json()
        job = runner.create(body.get("job_type"), body.get("params") or {})
    except (ValueError, AttributeError) as exc:
        return JSONResponse({"error": str(exc) or "Invalid JSON"}, status_code=400)
    except JobError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(job.to_dict(), status_code=201,
                        headers={"Location": f"/api/jobs/{job.id}"})


def _sse(name: str, data: dict, seq: int) -> str:
    return f"id: {seq}\nevent: {name}\ndata: {json.dumps(data)}\n\n"


async def progress(request: Request) -> Response:
    job = runner.jobs.get(int(request.path_params["id"]))
    if job is None:
        return JSONResponse({"error": "Job not found"}, status_code=404)
    queue: asyncio.Queue = asyncio.Queue()
    runner.hub.follow(job.id, queue)

    async def stream():
        try:
            yield _sse("status", job.status_data(), runner.hub.seq)
            if job.finished:
                yield _sse("complete", {"status": job.status, "result": job.result},
                           runner.hub.seq)
                return
            while True:
                name, data, seq = await queue.get()
                yield _sse(name, data, seq)
                if name in TERMINAL:
                    return
        finally:
            runner.hub.unfollow(job.id, queue)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def ws_queue(websocket: WebSocket) -> None:
    await websocket.accept()
    queue: asyncio.Queue = asyncio.Queue()
    state = runner.queue_state()
    runner.hub.subscribers.add(queue)
    writer = asyncio.create_task(_write_events(websocket, queue))
    try:
        await websocket.send_text(json.dumps(state))
        while True:
            await _on_message(websocket, await websocket.receive_text())
    except WebSocketDisconnect:
        pass
    finally:
        runner.hub.subscribers.discard(queue)
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await writer


async def _write_events(websocket: WebSocket, queue: asyncio.Queue) -> None:
    while True:
        event = await queue.get()
        await websocket.send_text(json.dumps(event))


async def _on_message(websocket: WebSocket, text: str) -> None:
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if isinstance(message, dict) and message.get("type") == "ping":
        await websocket.send_text(json.dumps({"type": "pong", "ts": message.get("ts")}))
    elif isinstance(message, dict) and message.get("type") == "get_state":
        await websocket.send_text(json.dumps(runner.queue_state()))
    else:
        await websocket.send_text(json.dumps({"type": "error", "message": "Unsupported"}))


@asynccontextmanager
async def lifespan(app: Starlette):
    runner.start()
    yield
    await runner.stop()


app = Starlette(
    routes=[
        Route("/api/stats", stats),
        Route("/api/jobs", create_job, methods=["POST"]),
        Route("/api/jobs/{id:int}/progress", progress),
        WebSocketRoute("/ws/queue", ws_queue),
    ],
    lifespan=lifespan,
)
