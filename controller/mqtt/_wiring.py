"""Wires a runtime to its tuning file and (if enabled) its broker, for `greensite run` and the HIL suite."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

from config import SiteConfig
from controller.mqtt._broker import embedded_broker
from controller.mqtt._service import MqttService, broker_address
from controller.runtime import Runtime
from controller.tuning import TuningStore, follow_file

__all__ = ["site_services"]


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
    async with contextlib.AsyncExitStack() as stack:
        port = None
        if site.mqtt.broker == "embedded":
            port = await stack.enter_async_context(embedded_broker(site.mqtt.embedded_port))
        host, port, tls = broker_address(site, port)
        service = MqttService(site, runtime, tuning, host=host, port=port, tls=tls, identifier=identifier)
        service.attach()
        yield service
