"""The MQTT side of a running controller: status out, tuning commands in.

The control loop never waits on MQTT: a tick only appends to a bounded outbox (`offer`), and one
background task owns the connection. While the broker is away, status piles up in the outbox (the
oldest dropped first, and counted); on reconnect it is flushed in order, at least once (QoS 1).
Commands are validated off the loop (a worker thread does the schema and the fsync) and answered on
the reply topic with the command's correlation id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from config import SiteConfig
from controller.mqtt._payloads import Topics, discovery_messages, health_payload, plan_payload, state_payload
from controller.runtime import Runtime
from controller.strict_json import JsonLimits, JsonRefused, decode_json, json_type_name
from controller.tuning import PatchResult, TuningStore

__all__ = ["Backoff", "MqttService", "Outbox", "broker_address"]

_log = logging.getLogger(__name__)

# Reconnect back-off: first retry soon (a broker restart takes a second or two), then capped so a
# site whose broker is gone for hours still comes back within a minute of it returning.
RECONNECT_INITIAL_S = 0.5
RECONNECT_CAP_S = 30.0
# A publish that gets no PUBACK in this long means the connection is dead, whatever TCP believes.
PUBLISH_TIMEOUT_S = 5.0
# On a clean stop, the last status and `offline` get this long to reach the broker.
FINAL_FLUSH_TIMEOUT_S = 3.0
# Device health is re-sent at least this often (wall time) even if nothing changed.
HEALTH_PERIOD_S = 30.0
KEEPALIVE_S = 15  # the broker declares us offline (last will) within 1.5× this of a dead link
HA_STATUS_TOPIC_SUFFIX = "status"  # Home Assistant's birth/will topic under its discovery prefix
MAX_CORRELATION_ID_CHARS = 200
MAX_REQUESTED_BY_CHARS = 100
MAX_ERROR_CHARS = 300  # one reply line; a hostile key name must not make a 16 kB reply
COMMAND_KEYS = frozenset({"correlation_id", "patch", "requested_by", "base_version"})


V5 = aiomqtt.ProtocolVersion.V5
_UNSUPPORTED_PROTOCOL_RC = 132  # CONNACK "unsupported protocol version" (3.1.1's code 1, as paho maps it)


def _unsupported_protocol(error: BaseException) -> bool:
    if not isinstance(error, MqttConnectError):
        return False
    rc = error.rc
    return (rc.value if isinstance(rc, ReasonCode) else rc) in (_UNSUPPORTED_PROTOCOL_RC, 1)


@dataclass(frozen=True, slots=True)
class _Message:
    topic: str
    payload: bytes
    retain: bool


@dataclass(slots=True)
class CommandCounters:
    """Tuning commands since start: each is received once and then accepted, refused or failed
    (refused by an exception in our own code: answered, logged with its traceback)."""

    received: int = 0
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    retained_ignored: int = 0


class Outbox:
    """Two bounded queues: control messages (replies, config state, plan), never dropped below the
    bound, and status, where the oldest goes first when full."""

    def __init__(self, status_capacity: int, control_capacity: int = 1000) -> None:
        self.status: deque[_Message] = deque()
        self.control: deque[_Message] = deque()
        self.status_capacity = status_capacity
        self.control_capacity = control_capacity
        self.dropped = 0
        self.wakeup = asyncio.Event()

    def put(self, message: _Message, *, control: bool = False) -> None:
        queue, capacity = (self.control, self.control_capacity) if control else (self.status, self.status_capacity)
        if len(queue) >= capacity:
            queue.popleft()
            self.dropped += 1
        queue.append(message)
        self.wakeup.set()

    def peek(self) -> tuple[_Message, deque[_Message]] | None:
        for queue in (self.control, self.status):
            if queue:
                return queue[0], queue
        return None

    def __len__(self) -> int:
        return len(self.status) + len(self.control)


class Backoff:
    """Jittered, capped exponential back-off (full jitter over the upper half)."""

    def __init__(self, initial_s: float = RECONNECT_INITIAL_S, cap_s: float = RECONNECT_CAP_S) -> None:
        self.initial_s, self.cap_s = initial_s, cap_s
        self._next_s = initial_s

    def reset(self) -> None:
        self._next_s = self.initial_s

    def next_delay_s(self) -> float:
        delay = self._next_s
        self._next_s = min(self.cap_s, self._next_s * 2)
        return random.uniform(delay / 2, delay)  # jitter, not cryptography


def broker_address(site: SiteConfig, embedded_port: int | None) -> tuple[str, int, bool]:
    """(host, port, tls) for the configured broker; `embedded_port` is where the embedded one listens."""
    broker = site.mqtt.broker
    if broker == "embedded":
        if embedded_port is None:
            raise ValueError('broker is "embedded" but no embedded broker is running')
        return "127.0.0.1", embedded_port, False
    parts = urlsplit(broker)
    tls = parts.scheme == "mqtts"
    if parts.hostname is None:
        raise ValueError(f"broker {broker!r} has no host")
    return parts.hostname, parts.port or (8883 if tls else 1883), tls


class MqttService:
    """Attach to a runtime with `attach()`; the runtime runs `service()` in its TaskGroup."""

    def __init__(
        self,
        site: SiteConfig,
        runtime: Runtime,
        tuning: TuningStore,
        *,
        host: str,
        port: int,
        tls: bool = False,
        identifier: str | None = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        """`credentials` (user, password) replace the site file's: the embedded broker's own account."""
        self.site = site
        self.runtime = runtime
        self.tuning = tuning
        self.host, self.port, self.tls = host, port, tls
        self.credentials = credentials
        # MQTT 5 tells a subscriber that a command was published retained even when it arrives live
        # (retain as published); under 3.1.1 only replays carry the flag. amqtt speaks 3.1.1 only; an
        # external broker that does not speak 5 is answered with 3.1.1 on the next attempt.
        self.protocol = aiomqtt.ProtocolVersion.V311 if site.mqtt.broker == "embedded" else V5
        self.identifier = identifier or f"greensite-{site.site.id}"
        self.topics = Topics(site.topic_prefix)
        self.outbox = Outbox(site.mqtt.outbox_messages)
        self.connected = asyncio.Event()
        self.connections = 0
        self.failures = 0  # the service restarted after an exception of ours (not a lost connection)
        self.commands = CommandCounters()
        self._min_interval_s = 1.0 / site.mqtt.status_max_rate_hz
        self._last_state_wall = -float("inf")
        self._last_health_wall = -float("inf")
        self._last_health_states: dict[str, str] = {}
        self._plans_published = -1
        self._apply_lock = asyncio.Lock()

    @property
    def commands_answered(self) -> int:
        return self.commands.received

    def attach(self) -> None:
        self.runtime.listeners.append(self._on_tick)
        self.runtime.services.append(self.service)
        self.publish_config_state()

    def publish_config_state(self) -> None:
        """The effective tuning, retained: after every accepted change, from MQTT or from a shell."""
        self.outbox.put(self._json(self.topics.config_state, self.tuning.state(), retain=True), control=True)

    # --- from the tick (synchronous, cheap) -----------------------------------------------------------

    @staticmethod
    def _json(topic: str, body: Any, *, retain: bool) -> _Message:
        return _Message(topic, json.dumps(body, separators=(",", ":"), allow_nan=False, default=str).encode(), retain)

    def _on_tick(self, runtime: Runtime) -> None:
        wall = time.monotonic()
        if wall - self._last_state_wall >= self._min_interval_s:
            self._last_state_wall = wall
            self.outbox.put(self._json(self.topics.state, state_payload(runtime), retain=True))
        states = {name: str(runtime.buses[bus].health(name).state) for name, bus in runtime.bus_of.items()}
        if states != self._last_health_states or wall - self._last_health_wall >= HEALTH_PERIOD_S:
            self._last_health_states, self._last_health_wall = states, wall
            body = health_payload(runtime, self.outbox.dropped, asdict(self.commands))
            self.outbox.put(self._json(self.topics.health, body, retain=True), control=True)
        if runtime.stats.plans != self._plans_published:
            self._plans_published = runtime.stats.plans
            plan = plan_payload(runtime)
            if plan is not None:
                self.outbox.put(self._json(self.topics.plan, plan, retain=True), control=True)

    # --- the connection ---------------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        mqtt = self.site.mqtt
        tls_params = None
        if self.tls:
            tls = mqtt.tls
            tls_params = aiomqtt.TLSParameters(
                ca_certs=tls.ca_file if tls else None,
                certfile=tls.cert_file if tls else None,
                keyfile=tls.key_file if tls else None,
            )
        username = mqtt.username
        password = mqtt.password.get_secret_value() if mqtt.password is not None else None
        if self.credentials is not None:
            username, password = self.credentials
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.identifier,
            username=username,
            password=password,
            will=aiomqtt.Will(self.topics.availability, b"offline", qos=1, retain=True),
            tls_params=tls_params,
            keepalive=KEEPALIVE_S,
            timeout=PUBLISH_TIMEOUT_S,
            protocol=self.protocol,
            # A fresh session each time: 3.1.1 says it with clean_session, 5 with clean_start.
            clean_session=None if self.protocol is V5 else True,
            clean_start=True if self.protocol is V5 else MQTT_CLEAN_START_FIRST_ONLY,
        )

    async def service(self) -> None:
        """Connect, publish, listen; on any MQTT error wait (jittered, capped) and connect again."""
        backoff = Backoff()
        while True:
            try:
                async with self._client() as client:
                    backoff.reset()
                    self.connections += 1
                    await self._session(client)
            except* (aiomqtt.MqttError, OSError, TimeoutError) as group:
                self.connected.clear()
                if self.protocol is V5 and any(_unsupported_protocol(e) for e in group.exceptions):
                    self.protocol = aiomqtt.ProtocolVersion.V311  # the next attempt (after the back-off)
                    _log.warning("MQTT broker does not speak MQTT 5, using 3.1.1: a retained command published "
                                 "while the controller listens then arrives as a live one",
                                 extra={"broker": f"{self.host}:{self.port}"})  # fmt: skip
                else:
                    _log.warning("MQTT connection lost", extra={"broker": f"{self.host}:{self.port}",
                                                                "error": str(group.exceptions[0])[:300]})  # fmt: skip
            except* Exception as group:
                # A bug of ours: this service runs in the control loop's TaskGroup, and only the control
                # loop's own death may end the process. Logged with its traceback, counted, restarted.
                self.connected.clear()
                self.failures += 1
                _log.error("MQTT service failed, restarting it", exc_info=group.exceptions[0])
            await asyncio.sleep(backoff.next_delay_s())

    async def _session(self, client: aiomqtt.Client) -> None:
        try:
            await client.publish(self.topics.availability, b"online", qos=1, retain=True)
            for topic in (self.topics.config_set, f"{self.topics.config_set}/+"):  # shared; per-user
                if self.protocol is V5:  # the retain flag as published, also on commands sent while we listen
                    await client.subscribe(topic, options=SubscribeOptions(qos=1, retainAsPublished=True))
                else:
                    await client.subscribe(topic, qos=1)
            if self.site.forecast.external_mqtt:
                await client.subscribe(self.topics.forecast_set, qos=1)
            if self.site.mqtt.ha_discovery:
                await client.subscribe(f"{self.site.mqtt.ha_discovery_prefix}/{HA_STATUS_TOPIC_SUFFIX}", qos=1)
                await self._send_discovery(client)
            self._requeue_retained()
            self.connected.set()
            _log.info("MQTT connected", extra={"broker": f"{self.host}:{self.port}", "queued": len(self.outbox)})
            async with asyncio.TaskGroup() as group:
                group.create_task(self._drain(client), name="mqtt-drain")
                group.create_task(self._receive(client), name="mqtt-receive")
        finally:
            self.connected.clear()
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                await self._final_flush(client)

    def _requeue_retained(self) -> None:
        """A broker that lost its retained messages (restarted without persistence, or another broker
        behind the same address) learns config/state, plan and health again on every connect. Queued
        behind anything older still waiting, so the newest is the one left retained."""
        self.publish_config_state()
        plan = plan_payload(self.runtime)
        if plan is not None:
            self.outbox.put(self._json(self.topics.plan, plan, retain=True), control=True)
        health = health_payload(self.runtime, self.outbox.dropped, asdict(self.commands))
        self.outbox.put(self._json(self.topics.health, health, retain=True), control=True)

    async def _final_flush(self, client: aiomqtt.Client) -> None:
        """On a clean stop: what is queued, then `offline` (a clean disconnect sends no last will)."""
        with contextlib.suppress(aiomqtt.MqttError, TimeoutError, OSError):
            async with asyncio.timeout(FINAL_FLUSH_TIMEOUT_S):
                while (head := self.outbox.peek()) is not None:
                    message, queue = head
                    await client.publish(message.topic, message.payload, qos=1, retain=message.retain)
                    queue.popleft()
                await client.publish(self.topics.availability, b"offline", qos=1, retain=True)

    async def _send_discovery(self, client: aiomqtt.Client) -> None:
        for topic, payload in discovery_messages(self.site, self.topics):
            await client.publish(topic, payload, qos=1, retain=True)

    async def _drain(self, client: aiomqtt.Client) -> None:
        while True:
            head = self.outbox.peek()
            if head is None:
                self.outbox.wakeup.clear()
                await self.outbox.wakeup.wait()
                continue
            message, queue = head
            await client.publish(message.topic, message.payload, qos=1, retain=message.retain)
            if queue and queue[0] is message:  # removed only once the broker has it: at least once
                queue.popleft()

    async def _receive(self, client: aiomqtt.Client) -> None:
        ha_status = f"{self.site.mqtt.ha_discovery_prefix}/{HA_STATUS_TOPIC_SUFFIX}"
        async for message in client.messages:
            topic = str(message.topic)
            payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
            if topic == ha_status:
                if payload == b"online" and self.site.mqtt.ha_discovery:
                    await self._send_discovery(client)  # Home Assistant restarted: tell it again
                continue
            if topic == self.topics.forecast_set:
                if payload:  # an empty message clears a retained forecast
                    self.outbox.put(self._json(self.topics.forecast_reply, self.handle_forecast(payload),
                                               retain=False), control=True)  # fmt: skip
                await asyncio.sleep(0)
                continue
            sender = self.topics.command_sender(topic)
            if sender is None or not payload:
                continue  # an empty message clears a retained command (ours, or the sender's): nothing to answer
            try:
                reply = await self.handle_command(payload, retained=message.retain, sender=sender or None)
                self.outbox.put(self._json(self.topics.config_reply, reply, retain=False), control=True)
            except Exception:  # handle_command answers everything; this is for our own reply's encoding
                self.commands.failed += 1
                _log.exception("tuning command reply failed", extra={"topic": topic})
            if message.retain:
                self.commands.retained_ignored += 1
                # Left retained, the command would be refused again on every reconnect; clear it where
                # the broker lets us (an ACL may not: then it is refused each time, never applied).
                await client.publish(topic, b"", qos=1, retain=True)
            # Queued messages are handed over without suspending: yield, so that a burst of commands never
            # holds the control loop for more than one command's handling at a time.
            await asyncio.sleep(0)

    # --- commands ---------------------------------------------------------------------------------------

    def handle_forecast(self, payload: bytes) -> dict[str, Any]:
        """Take an external forecast (retained ones too: its issued_at decides whether it is still fresh);
        returns the reply, never raises on any input."""
        try:
            errors = self.runtime.accept_forecast(payload, origin="mqtt")
        except Exception as err:  # a payload must never end the controller
            _log.exception("forecast handling failed", extra={"error_type": type(err).__name__})
            errors = [f"internal error while handling the forecast ({type(err).__name__}); see the controller log"]
        shown = [line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..." for line in errors]
        return {"accepted": not errors, "errors": shown}

    async def handle_command(
        self, payload: bytes, *, retained: bool = False, sender: str | None = None
    ) -> dict[str, Any]:
        """Validate and apply one tuning command; always returns the reply, never raises on any input
        (every exception is answered and counted; cancellation still propagates). `sender` is the
        username the command topic carries (`config/set/<user>`), which the broker's ACL vouches for."""
        self.commands.received += 1
        try:
            reply = await self._command(payload, retained=retained, sender=sender)
        except Exception as err:  # a payload must never end the controller: logged, answered, counted
            self.commands.failed += 1
            _log.exception("tuning command failed", extra={"error_type": type(err).__name__})
            line = f"internal error while handling the command ({type(err).__name__}); see the controller log"
            reply = {"correlation_id": None, "accepted": False, "errors": [line]}
        if reply.get("accepted"):
            self.commands.accepted += 1
        else:
            self.commands.refused += 1
        return reply

    async def _command(self, payload: bytes, *, retained: bool, sender: str | None) -> dict[str, Any]:
        try:
            body = decode_json(payload, JsonLimits(max_bytes=self.site.mqtt.max_payload_bytes))
        except JsonRefused as err:
            return self._reply(None, err.errors)
        if not isinstance(body, dict):
            return self._reply(None, [f'payload: expected {{"correlation_id", "patch"}}, got {json_type_name(body)}'])
        correlation_id: Any = body.get("correlation_id")
        errors = []
        if correlation_id is not None and (
            not isinstance(correlation_id, str | int) or isinstance(correlation_id, bool)
            or len(str(correlation_id)) > MAX_CORRELATION_ID_CHARS
        ):  # fmt: skip
            errors.append(f"correlation_id: a string or integer of at most {MAX_CORRELATION_ID_CHARS} characters")
            correlation_id = None
        unknown = sorted(set(body) - COMMAND_KEYS)
        if unknown:
            shown = [key[:40] for key in unknown[:5]]
            errors.append(f"payload: unknown keys {shown}; expected {', '.join(sorted(COMMAND_KEYS))}")
        requested_by = body.get("requested_by")
        if requested_by is not None and (not isinstance(requested_by, str)
                                         or not 0 < len(requested_by) <= MAX_REQUESTED_BY_CHARS):  # fmt: skip
            errors.append(f"requested_by: a string of 1 to {MAX_REQUESTED_BY_CHARS} characters")
        base_version = body.get("base_version")
        if base_version is not None and (not isinstance(base_version, int) or isinstance(base_version, bool)
                                         or base_version < 0):  # fmt: skip
            errors.append("base_version: a JSON integer, the version of config/state the patch was made against")
        if "patch" not in body:
            errors.append("patch: missing; send the [tuning] fields to change as a JSON object")
        if retained:
            errors.append("retained: a retained command is never applied (it would replay on every reconnect); "
                          "publish commands with retain off")  # fmt: skip
        if not self.site.mqtt.remote_tuning:
            errors.append("remote tuning is disabled for this site (mqtt.remote_tuning = false in the site file)")
        if errors:
            return self._reply(correlation_id, errors)
        if sender is not None:
            by, verified = f"mqtt-user:{sender}", True
        else:
            by, verified = f"mqtt:{requested_by or 'anonymous'} (self-declared)", False
        async with self._apply_lock:  # one patch at a time, in arrival order
            applying = asyncio.ensure_future(asyncio.to_thread(
                functools.partial(self.tuning.apply, body["patch"], by=by, via="mqtt", verified=verified,
                                  requested_by=requested_by, correlation_id=correlation_id,
                                  base_version=base_version)
            ))  # fmt: skip
            try:
                result = await asyncio.shield(applying)
            except asyncio.CancelledError:
                # The thread goes on and may write the file: the runtime must still be handed what it wrote.
                applying.add_done_callback(self._adopt_late)
                raise
        if not result.accepted:
            return self._reply(correlation_id, result.errors, result.version)
        self._adopt(result)
        return {"correlation_id": correlation_id, **result.to_json()}

    def _adopt(self, result: PatchResult) -> None:
        if result.accepted and result.site is not None:
            self.runtime.request_site(result.site)
            self.publish_config_state()

    def _adopt_late(self, applying: asyncio.Future[PatchResult]) -> None:
        """A patch whose command was cancelled (connection lost, shutdown) while its thread wrote it."""
        if applying.cancelled():
            return
        error = applying.exception()
        if error is not None:
            _log.error("tuning patch failed after its command was cancelled", extra={"error": repr(error)[:300]})
            return
        self._adopt(applying.result())

    def _reply(self, correlation_id: Any, errors: list[str], version: int | None = None) -> dict[str, Any]:
        shown = [line if len(line) <= MAX_ERROR_CHARS else line[: MAX_ERROR_CHARS - 3] + "..." for line in errors[:20]]
        _log.info("tuning command refused", extra={"correlation_id": correlation_id, "errors": shown[:5]})
        body: dict[str, Any] = {"correlation_id": correlation_id, "accepted": False, "errors": shown}
        if version is not None:
            body["version"] = version
        return body
