"""A real Mosquitto broker on a free loopback port (which a test may kill and restart on the same port),
and a subscriber that records what it hears. Used by the MQTT tests and the HIL suite."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

__all__ = ["Mosquitto", "Subscriber", "mosquitto"]

# A broker that is not accepting connections this long after start is broken, not slow.
BROKER_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Mosquitto:
    folder: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_config: str = ""  # TLS, password file, ... appended to the listener's settings

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.folder / "mosquitto.conf"
        # Persistence (saved every second) lets a subscriber's session outlive a killed broker.
        # Started as root, mosquitto drops to its own user, which cannot write our temp folder: stay us.
        anonymous = "allow_anonymous" not in self.extra_config
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n{'allow_anonymous true' if anonymous else ''}\npersistence true\n"
            f"persistence_location {self.folder}/\nautosave_interval 1\nuser {getpass.getuser()}\n"
            + self.extra_config
        )
        log = (self.folder / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + BROKER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        log_text = (self.folder / "mosquitto.log").read_text()
        raise RuntimeError(f"mosquitto did not start on port {self.port}: {log_text}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed: run scripts/test, which installs it")
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@dataclass
class Subscriber:
    """Collects every message on `topics` into `messages` (topic, decoded JSON or text, retain)."""

    port: int
    topics: list[str]
    identifier: str | None = None  # with an identifier the session persists (clean_session false)
    messages: list[tuple[str, Any, bool]] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def of(self, topic: str) -> list[Any]:
        return [body for t, body, _ in self.messages if t == topic]

    async def run(self) -> None:
        """Stays subscribed across broker restarts (reconnects every 50 ms)."""
        while True:
            try:
                persistent = self.identifier is not None
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier=self.identifier, clean_session=not persistent
                ) as client:
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        raw = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
                        try:
                            body: Any = json.loads(raw)
                        except ValueError:
                            body = raw.decode(errors="replace")
                        self.messages.append((str(message.topic), body, message.retain))
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def subscribed(port: int, *topics: str, identifier: str | None = None) -> AsyncIterator[Subscriber]:
    subscriber = Subscriber(port, list(topics), identifier)
    task = asyncio.create_task(subscriber.run(), name="test-subscriber")
    try:
        await asyncio.wait_for(subscriber.connected.wait(), BROKER_START_TIMEOUT_S)
        yield subscriber
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_for(predicate: Any, timeout_s: float = 10.0) -> None:
    """Poll a condition from a test (wall time)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
