"""Wires a runtime to its tuning file and (if enabled) its broker, for `greensite run` and the HIL suite."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator

from config import SiteConfig
from config._preflight import preflight
from controller.mqtt._broker import BrokerAccess, embedded_broker
from controller.mqtt._broker_auth import CONTROLLER_USER, broker_users, users_path
from controller.mqtt._payloads import Topics
from controller.mqtt._service import MqttService, broker_address
from controller.runtime import Runtime
from controller.tuning import TuningStore, follow_file

__all__ = ["site_services"]

_log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def site_services(
    runtime: Runtime, tuning: TuningStore, *, mqtt: bool = True, identifier: str | None = None
) -> AsyncIterator[MqttService | None]:
    """Follow the tuning file; start the embedded broker if the site asks for one; attach the MQTT
    service. Yields the service (None when MQTT is off). Leave the context after the runtime stopped."""
    site = runtime.site
    service: MqttService | None = None

    def on_change(new_site: SiteConfig) -> None:
        runtime.request_site(new_site)
        if service is not None:
            service.publish_config_state()

    runtime.services.append(functools.partial(follow_file, tuning, on_change))
    if not mqtt or not site.mqtt.enabled:
        yield None
        return
    # The control loop starts whatever MQTT's state; what `greensite validate` would refuse about the
    # broker settings is said here by field, not found later as "connection lost: No such file".
    for problem in preflight(site):
        if problem.startswith("mqtt."):
            _log.error("MQTT settings will not work", extra={"problem": problem})
    async with contextlib.AsyncExitStack() as stack:
        port, credentials = None, None
        if site.mqtt.broker == "embedded":
            access = None
            if site.mqtt.remote_tuning:  # who may tune must be known: no anonymous clients then
                users = broker_users(users_path(site.storage.path))
                topics = Topics(site.topic_prefix)
                access = BrokerAccess(users, topics.config_set, [topics.prefix, site.mqtt.ha_discovery_prefix])
                credentials = (CONTROLLER_USER, users[CONTROLLER_USER])
            port = await stack.enter_async_context(embedded_broker(site.mqtt.embedded_port, access))
        host, port, tls = broker_address(site, port)
        service = MqttService(site, runtime, tuning, host=host, port=port, tls=tls, identifier=identifier,
                              credentials=credentials)  # fmt: skip
        service.attach()
        yield service
