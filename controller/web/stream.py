"""Live updates to web pages (server-sent events): one snapshot per tick at most `max_rate_hz` (wall time),
encoded once and handed to every client's bounded queue without waiting. A client whose queue is full (it
reads slower than the site ticks, or it is gone) is dropped; the control loop never waits on a browser."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from controller.runtime import Runtime

__all__ = ["StreamHub", "Subscriber"]

_log = logging.getLogger(__name__)

# Messages a client may have waiting: two seconds of updates at the default 4 Hz. A browser that is not
# reading them (a laptop lid closed, a dead Wi-Fi link) fills it within seconds and is dropped; it
# reconnects on its own (EventSource) when it is back.
QUEUE_MESSAGES = 8
# A comment line this often when nothing else is sent: proxies keep the connection, and a write to a
# client that went away fails within this long instead of never.
HEARTBEAT_S = 15.0
# An update that fails to build is logged the first time and then once in this many (it would repeat every tick).
FAILURE_LOG_EVERY = 1000
# What the browser waits before reconnecting after the stream ends (the SSE `retry` field).
RETRY_MS = 2000


# Put in a client's queue when the hub gives up on it (after emptying the queue): its handler stops there.
# One queue to wait on per client keeps a message's cost to a queue hand-over (no future or task per message).
_END = b""


class Subscriber:
    """One connected client: its queue, and whether the hub gave up on it."""

    __slots__ = ("dropped", "queue")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_MESSAGES)
        self.dropped = asyncio.Event()

    def end(self) -> None:
        """The hub gives up on this client: what it has not read is discarded and its handler returns."""
        self.dropped.set()
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_END)


class StreamHub:
    """Attach `on_tick` as a runtime listener; `respond` serves one client until it leaves or is dropped."""

    def __init__(
        self,
        build: Callable[[Runtime], dict[str, Any]],
        *,
        max_rate_hz: float,
        max_clients: int,
        event: str = "state",
        wall: Callable[[], float] = time.monotonic,
    ) -> None:
        self._build = build
        self._min_interval_s = 1.0 / max_rate_hz
        self.max_clients = max_clients
        self._event = event
        self._wall = wall
        self._last_wall = -float("inf")
        self._clients: set[Subscriber] = set()
        self.latest: bytes | None = None  # the last message sent, for a client that connects between ticks
        self.sent = 0  # messages encoded
        self.dropped = 0  # clients dropped for not keeping up
        self.failures = 0  # updates that could not be built (logged on the first and every FAILURE_LOG_EVERY)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def on_tick(self, runtime: Runtime) -> None:
        """From the tick: cheap and never waiting. One build and one encoding, whoever is listening."""
        if not self._clients:
            return
        wall = self._wall()
        if wall - self._last_wall < self._min_interval_s:
            return
        self._last_wall = wall
        try:
            self.publish(self._build(runtime))
        except Exception:  # a listener runs inside the tick: a bad value must cost an update, never the loop
            self.failures += 1
            if self.failures == 1 or self.failures % FAILURE_LOG_EVERY == 0:
                _log.exception("live update not built", extra={"event": self._event, "failures": self.failures})

    def publish(self, body: dict[str, Any]) -> None:
        data = json.dumps(body, separators=(",", ":"), allow_nan=False, default=str)
        message = f"event: {self._event}\ndata: {data}\n\n".encode()
        self.latest = message
        self.sent += 1
        for client in list(self._clients):
            try:
                client.queue.put_nowait(message)
            except asyncio.QueueFull:
                self._drop(client)

    def close(self) -> None:
        """End every stream (the server is stopping): each handler returns, the browsers reconnect later."""
        for client in list(self._clients):
            self._clients.discard(client)
            client.end()

    def _drop(self, client: Subscriber) -> None:
        self._clients.discard(client)
        client.end()
        self.dropped += 1
        _log.info("live-update client dropped: not reading", extra={"event": self._event, "clients": self.clients})

    async def respond(self, request: web.Request, first: dict[str, Any]) -> web.StreamResponse:
        """Serve one client: `first` at once, then every message the hub publishes, until the client leaves,
        is dropped, or the server stops."""
        if len(self._clients) >= self.max_clients:
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": f"too many live-update clients (at most {self.max_clients}); retry later"}),
                content_type="application/json", headers={"Retry-After": "10"},
            )  # fmt: skip
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",  # a reverse proxy must not sit on the updates
        })  # fmt: skip
        await response.prepare(request)
        client = Subscriber()
        self._clients.add(client)
        try:
            data = json.dumps(first, separators=(",", ":"), allow_nan=False, default=str)
            await response.write(f"retry: {RETRY_MS}\nevent: {self._event}\ndata: {data}\n\n".encode())
            while True:
                try:
                    async with asyncio.timeout(HEARTBEAT_S):
                        message = await client.queue.get()
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if message is _END:
                    break
                await response.write(message)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away: nothing to answer
        finally:
            self._clients.discard(client)
        return response
