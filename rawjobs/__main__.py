"""The command line: ``python -m rawjobs --port 5001`` (or the ``rawjobs`` script)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable

from .app import LOOPBACK_HOSTS, Settings, default_fanout_threads, serve
from .core.jobs import JobTypeError
from .web.server import Limits
from .web.websocket import WebSocketConfig

log = logging.getLogger("rawjobs")


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def _non_negative(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _positive(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rawjobs", description="Self-hosted async job runner "
                                "with a live dashboard (HTTP, SSE, WebSocket).")
    a = p.add_argument
    a("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    a("--port", type=int, default=5001, help="port to listen on (default %(default)s)")
    a("--db", default="rawjobs.db",
      help="SQLite file for jobs, :memory: to keep nothing, or a postgresql:// URL "
           "shared by several nodes (default %(default)s)")
    a("--concurrency", type=_non_negative, default=3,
      help="jobs run at once; 0 serves the API without running jobs (default %(default)s)")
    a("--jobs", action="append", default=[], metavar="MODULE",
      help="import MODULE to register its job types (repeatable)")
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    a("--grace", type=float, default=10.0,
      help="seconds running jobs get to finish at shutdown (default %(default)s)")
    a("--keep-finished", type=int, default=10_000,
      help="finished jobs kept; older ones are pruned (default %(default)s)")
    a("--max-pending", type=int, default=100_000,
      help="pending jobs before POST /api/jobs answers 429 (default %(default)s)")
    a("--max-connections", type=int, default=10_000,
      help="open connections before new ones get 503 (default %(default)s)")
    a("--max-subscriber-buffer", type=int, default=256 * 1024, metavar="BYTES",
      help="bytes an SSE/WebSocket subscriber may lag before it is disconnected "
           "(default %(default)s)")
    a("--fanout-slice", type=_positive, default=256, metavar="N",
      help="subscribers one event is written to before other work gets a turn "
           "(default %(default)s)")
    a("--fanout-threads", type=_non_negative, default=None, metavar="N",
      help="threads besides the event loop's that write one event to a large channel's "
           "subscribers, 0 for none (default: 1 when 2 or more CPUs are available)")
    a("--max-head-size", type=int, default=16 * 1024, metavar="BYTES",
      help="request line plus headers, 431 past it (default %(default)s)")
    a("--max-body-size", type=int, default=1024 * 1024, metavar="BYTES",
      help="request body, 413 past it (default %(default)s)")
    a("--head-timeout", type=float, default=10.0,
      help="seconds for a request head to arrive, 408 past it (default %(default)s)")
    a("--keepalive-timeout", type=float, default=5.0,
      help="seconds an idle keep-alive connection stays open (default %(default)s)")
    a("--write-timeout", type=float, default=10.0,
      help="seconds a response write may wait for the client to read before the "
           "connection is dropped (default %(default)s)")
    a("--sse-keepalive", type=float, default=15.0,
      help="seconds between ': keepalive' comments on idle event streams "
           "(default %(default)s)")
    a("--static-dir", default=None, metavar="DIR",
      help="serve the dashboard from DIR instead of the packaged static files")
    a("--ws-max-message", type=int, default=64 * 1024, metavar="BYTES",
      help="WebSocket message size, close 1009 past it (default %(default)s)")
    a("--ws-ping-interval", type=float, default=20.0,
      help="seconds between WebSocket pings; a peer silent for as long again is "
           "closed (default %(default)s)")
    a("--allowed-origin", action="append", default=[], metavar="ORIGIN",
      help="WebSocket Origin accepted besides this server's own (repeatable)")
    a("--allowed-host", action="append", default=[], metavar="HOST",
      help="Host header accepted besides localhost, 127.0.0.1, [::1] and --host "
           "(repeatable)")
    a("--token", default=os.environ.get("RAWJOBS_TOKEN"),
      help="require 'Authorization: Bearer TOKEN' (or ?token=) on /api and /ws "
           "(default: $RAWJOBS_TOKEN, else none)")
    a("--node-id", default=None,
      help="this node's name with PostgreSQL (default: hostname-pid)")
    a("--heartbeat", type=float, default=5.0,
      help="seconds between a node's heartbeats with PostgreSQL (default %(default)s)")
    a("--lease", type=float, default=15.0,
      help="seconds a running job's lease lasts without a heartbeat (default %(default)s)")
    a("--loop", choices=["asyncio", "uvloop"], default="asyncio",
      help="event loop: asyncio's own, or uvloop (pip install 'rawjobs[uvloop]') "
           "(default %(default)s)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        host=args.host, port=args.port, db=args.db, concurrency=args.concurrency,
        jobs=args.jobs, grace=args.grace, keep_finished=args.keep_finished,
        max_pending=args.max_pending, max_subscriber_buffer=args.max_subscriber_buffer,
        fanout_slice=args.fanout_slice,
        fanout_threads=(default_fanout_threads() if args.fanout_threads is None
                        else args.fanout_threads),
        sse_keepalive=args.sse_keepalive, static_dir=args.static_dir,
        limits=Limits(max_head=args.max_head_size, max_body=args.max_body_size,
                      head_timeout=args.head_timeout,
                      keepalive_timeout=args.keepalive_timeout,
                      write_timeout=args.write_timeout,
                      max_connections=args.max_connections),
        websocket=WebSocketConfig(max_message=args.ws_max_message,
                                  ping_interval=args.ws_ping_interval,
                                  ping_timeout=args.ws_ping_interval,
                                  allowed_origins=tuple(args.allowed_origin)),
        allowed_hosts=args.allowed_host, token=args.token or None,
        node_id=args.node_id, heartbeat=args.heartbeat, lease=args.lease,
    )


def raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-file limit to the hard one; warn if it is below
    ``wanted`` connections (plus some for files, pipes and the store)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("raised the open-file limit from %d to %d", soft, hard)
    if hard != resource.RLIM_INFINITY and hard < wanted + 64:
        log.warning("open-file limit %d is below --max-connections %d: connections "
                    "past about %d will fail", hard, wanted, hard - 64)


async def _main(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, stop)
    await serve(settings, stop)


def _on_signal(stop: asyncio.Event) -> None:
    if stop.is_set():
        log.warning("second signal: exiting now")
        os._exit(1)
    log.info("shutting down")
    stop.set()


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``--loop``; raises ImportError without uvloop."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_from(args)
    raise_fd_limit(settings.limits.max_connections)
    if settings.host not in LOOPBACK_HOSTS and not settings.token:
        log.warning("listening on %s without --token: anyone who can reach this port "
                    "can run and cancel jobs", settings.host)
    try:
        loop_factory = _loop_factory(args.loop)
    except ImportError:
        print("rawjobs: --loop uvloop needs uvloop: pip install 'rawjobs[uvloop]'",
              file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_main(settings))
    except (ImportError, JobTypeError) as exc:
        print(f"rawjobs: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"rawjobs: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
