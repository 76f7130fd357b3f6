"""amqtt plugins of the embedded broker with authentication on: passwords from the accounts file, and
the ACL. Loaded by amqtt by their dotted names; nothing else imports this module (amqtt is heavy)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from controller.mqtt._broker_auth import CONTROLLER_USER

__all__ = ["AclPlugin", "PasswordPlugin"]


class PasswordPlugin(BaseAuthPlugin):  # type: ignore[misc] # amqtt is untyped
    """Username and password against the accounts file; no anonymous clients."""

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=dict)

    async def authenticate(self, *, session: Session) -> bool | None:
        users: dict[str, str] = self.config.users
        expected = users.get(session.username or "")
        given = session.password or ""
        return expected is not None and hmac.compare_digest(expected.encode(), given.encode())


class AclPlugin(BaseTopicPlugin):  # type: ignore[misc] # amqtt is untyped
    """The controller publishes anywhere under its topics; everyone else reads, and publishes only
    commands on `<command topic>/<own username>`."""

    @dataclass
    class Config:
        controller_user: str = CONTROLLER_USER
        command_topic: str = ""
        read_prefixes: list[str] = field(default_factory=list)

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None or session.username is None:
            return False
        if session.username == self.config.controller_user:
            return True
        if action is Action.PUBLISH:
            return bool(topic == f"{self.config.command_topic}/{session.username}")
        prefixes: list[str] = self.config.read_prefixes
        return any(topic == p or topic.startswith(p + "/") for p in prefixes)
