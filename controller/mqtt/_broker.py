"""`broker = "embedded"`: an in-process MQTT broker (amqtt) on 127.0.0.1, so the demo and small
sites publish with no setup. Production sites point at Mosquitto or EMQX instead."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

__all__ = ["BrokerAccess", "embedded_broker", "port_is_free"]

_log = logging.getLogger(__name__)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class BrokerAccess:
    """Accounts and topics of an embedded broker with authentication on (remote tuning on)."""

    users: dict[str, str]
    command_topic: str  # each non-controller user publishes only on <command_topic>/<username>
    read_prefixes: list[str]  # topics (and below) the other users may subscribe to


@contextlib.asynccontextmanager
async def embedded_broker(port: int, access: BrokerAccess | None = None) -> AsyncIterator[int]:
    """Run amqtt on 127.0.0.1. Without `access`, anonymous clients are allowed (loopback only: status
    stays on the box); with it, only its accounts connect, under its ACL. If `port` is taken (a system
    Mosquitto on 1883, say) or 0, a free port is used and logged. Yields the port."""
    from amqtt.broker import Broker  # noqa: PLC0415 - only sites with an embedded broker pay for importing it

    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)  # amqtt logs every packet at INFO
    if port == 0 or not port_is_free(port):
        wanted, port = port, _free_port()
        if wanted:
            _log.warning("embedded broker port busy, using another", extra={"wanted": wanted, "port": port})
    plugins: dict[str, dict[str, Any]] = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
    if access is not None:
        plugins = {
            "controller.mqtt._broker_plugins.PasswordPlugin": {"users": dict(access.users)},
            "controller.mqtt._broker_plugins.AclPlugin": {
                "command_topic": access.command_topic, "read_prefixes": list(access.read_prefixes),
            },
        }  # fmt: skip
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}}, "plugins": plugins})
    await broker.start()
    _log.info("embedded MQTT broker listening", extra={"address": f"mqtt://127.0.0.1:{port}",
                                                        "authentication": access is not None})  # fmt: skip
    try:
        yield port
    finally:
        await broker.shutdown()
