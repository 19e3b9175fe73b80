"""A small HTTP/1.1 load generator: asyncio, raw sockets, keep-alive connections, no third-party client.

bench/run.py starts it as a separate process for two jobs:

* open loop (`--rate R`): the half-load latency run. Request i is due at start + i/R whatever happened to
  the previous ones, and its latency is measured from that due time, not from when a connection became free.
  A slow server therefore shows up as latency (no "coordinated omission"), exactly what wrk2 would measure.
* closed loop (no `--rate`): the max-throughput run when wrk is not installed. Every connection sends its
  next request as soon as the previous answer arrived, like wrk.

The request is described by the same environment variables as bench/wrk.lua: BENCH_METHOD, BENCH_HEADERS
("Name: value" lines) and BENCH_BODY, and BENCH_RANDOM_TOKENS=N: each request's `{token}` in the body becomes one
of N seeded tokens at random (bench/scale.py). Both loops are bounded: by `--duration` and by `--max-requests`.
The result is one JSON object on stdout.

    BENCH_METHOD=GET python bench/loadgen.py http://127.0.0.1:8080/health/live --duration 5 --rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable
from urllib.parse import urlsplit

REQUEST_TIMEOUT = 5  # seconds; a request without its answer by then is an error (and its connection reset)
DRAIN_SECONDS = 10  # after the last request is due, wait at most this long for outstanding answers


def seeded_token(i: int) -> str:
    """The i-th token bench/scale.py seeds: 43 characters, the shape of a real one."""
    return f"scale{i:038d}"


def build_request(url: str) -> tuple[str, int, Callable[[], bytes]]:
    """Host, port and what makes the raw request bytes: built once from the URL and the BENCH_* environment."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    method = os.environ.get("BENCH_METHOD", "GET")
    body = template = os.environ.get("BENCH_BODY", "").encode()
    tokens = int(os.environ.get("BENCH_RANDOM_TOKENS") or 0)
    if tokens:
        if b"{token}" not in template:
            raise SystemExit("BENCH_RANDOM_TOKENS needs {token} in BENCH_BODY")
        body = template.replace(b"{token}", seeded_token(0).encode())  # every request's body has this length
    lines = [
        f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
        f"Host: {host}:{port}",
    ]
    lines += [line for line in os.environ.get("BENCH_HEADERS", "").split("\n") if line.strip()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if not tokens:
        raw = head + body
        return host, port, lambda: raw
    before, _, after = template.partition(b"{token}")
    return host, port, lambda: head + before + seeded_token(random.randint(1, tokens)).encode() + after


class Connection:
    """One keep-alive connection; `exchange` sends the request and reads one full response."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ValueError("chunked responses are not supported by this generator")
        if length:
            await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []  # seconds, one per completed request
        self.non2xx = 0
        self.errors = 0  # connection failures, resets, malformed answers

    def record(self, conn: Connection, status_or_exc: int | BaseException, started: float) -> None:
        if isinstance(status_or_exc, BaseException):
            self.errors += 1
            conn.close()  # reconnect on the next use
            return
        self.latencies.append(time.monotonic() - started)
        if status_or_exc >= 400:  # as wrk counts (bench/wrk.lua): a 304 is the answer jwks_304 expects
            self.non2xx += 1


async def _send(conn: Connection, request: bytes) -> int | BaseException:
    """The response status, or the exception that stands for a failed exchange."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            return await conn.exchange(request)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        return exc


async def open_loop(host, port, request, connections, duration, rate, max_requests, stats) -> int:
    """Send `rate` requests per second on a schedule; return how many were due (sent or not)."""
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(Connection(host, port))

    async def one(due: float) -> None:
        conn = await idle.get()  # waiting for a free connection counts as latency: it is measured from `due`
        try:
            stats.record(conn, await _send(conn, request()), due)
        finally:
            idle.put_nowait(conn)

    total = min(int(rate * duration), max_requests)
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # when behind schedule, no sleep: the backlog is sent at once
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, late = await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
        for task in late:  # never answered within the drain time: count as errors
            task.cancel()
            stats.errors += 1
    return total


async def closed_loop(host, port, request, connections, duration, max_requests, stats) -> int:
    """Every connection sends back to back until the duration or the request budget runs out."""
    end = time.monotonic() + duration
    budget = [max_requests]

    async def worker() -> None:
        conn = Connection(host, port)
        while time.monotonic() < end and budget[0] > 0:
            budget[0] -= 1
            started = time.monotonic()
            stats.record(conn, await _send(conn, request()), started)
        conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return max_requests - budget[0]


def percentile(sorted_values: list[float], pct: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * pct / 100))]


async def main_async(args: argparse.Namespace) -> dict:
    host, port, request = build_request(args.url)
    stats = Stats()
    started = time.monotonic()
    common = (host, port, request, args.connections, args.duration)
    if args.rate:
        sent = await open_loop(*common, args.rate, args.max_requests, stats)
    else:
        sent = await closed_loop(*common, args.max_requests, stats)
    elapsed = time.monotonic() - started
    lat = sorted(stats.latencies)

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 3)

    return {
        "tool": "bench/loadgen.py",
        "mode": "open-loop" if args.rate else "closed-loop",
        "target_rps": args.rate,
        "sent": sent,
        "requests": len(lat),
        "elapsed_s": round(elapsed, 3),
        "rps": round(len(lat) / elapsed, 1),
        "non2xx": stats.non2xx,
        "errors": stats.errors,
        "p50_ms": ms(percentile(lat, 50)),
        "p90_ms": ms(percentile(lat, 90)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("url")
    add("--connections", type=int, default=32)
    add("--duration", type=float, default=10.0, help="seconds")
    add("--rate", type=float, default=0.0, help="requests/s, open loop (default: closed loop)")
    add("--max-requests", type=int, default=2_000_000, help="hard cap on requests sent")
    args = parser.parse_args()
    try:
        import uvloop  # installed with uvicorn[standard]; a faster client leaves more CPU to the server

        result = uvloop.run(main_async(args))
    except ImportError:
        result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
