"""What the controller says over MQTT: topics, status payloads (JSON, units in the key names) and
Home Assistant discovery. Pure functions of the runtime's state: no I/O here."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from config import SiteConfig

if TYPE_CHECKING:
    from controller.runtime import Runtime

__all__ = ["Sensor", "Topics", "discovery_messages", "health_payload", "plan_payload", "state_payload"]

SOFTWARE_VERSION = "0.1.0"
MAX_USERNAME_CHARS = 64  # the last level of config/set/<username>


@dataclass(frozen=True, slots=True)
class Topics:
    """Every topic of a site, under its prefix (default `greensite/<site id>`)."""

    prefix: str

    @property
    def availability(self) -> str:
        return f"{self.prefix}/availability"  # retained; `offline` is the last will

    @property
    def state(self) -> str:
        return f"{self.prefix}/state"  # retained; one per tick (rate-limited)

    @property
    def health(self) -> str:
        return f"{self.prefix}/health"  # retained; device and bus health

    @property
    def plan(self) -> str:
        return f"{self.prefix}/plan"  # retained; the plan in force

    @property
    def config_state(self) -> str:
        return f"{self.prefix}/config/state"  # retained; the effective tuning

    @property
    def config_set(self) -> str:
        return f"{self.prefix}/config/set"  # command: {"correlation_id", "patch", "requested_by"}

    @property
    def forecast_set(self) -> str:
        return f"{self.prefix}/forecast/set"  # an external forecast (controller.external_forecast's shape)

    @property
    def forecast_reply(self) -> str:
        return f"{self.prefix}/forecast/reply"  # {"accepted", "errors"} for each forecast received

    @property
    def config_reply(self) -> str:
        return f"{self.prefix}/config/reply"  # answers, with the correlation id of the command

    def command_sender(self, topic: str) -> str | None:
        """For a command topic, the username it carries ("" on the shared `config/set`, whose sender is
        self-declared); None for any other topic. `config/set/<user>` names an authenticated user only
        where the broker's ACL lets each user publish to their own topic alone (see the README)."""
        if topic == self.config_set:
            return ""
        head = self.config_set + "/"
        if topic.startswith(head) and 0 < len(topic) - len(head) <= MAX_USERNAME_CHARS and "/" not in topic[len(head):]:
            return topic[len(head):]
        return None


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def state_payload(runtime: Runtime) -> dict[str, Any]:
    """One tick as a late subscriber (or Home Assistant) wants it."""
    measured, setpoints = runtime.last_measured, runtime.last_setpoints
    body: dict[str, Any] = {
        "ts": runtime.clock.local().isoformat(timespec="seconds"),
        "tick": runtime.stats.ticks,
        "controller_state": "starting",
    }
    if measured is not None and setpoints is not None:
        known = [kw for kw in measured.ev_kw.values() if kw is not None]
        ev_total = sum(known) if len(known) == len(measured.ev_kw) else None  # unknown is not zero
        load = None
        if measured.grid_kw is not None and measured.pv_kw is not None and measured.battery_kw is not None:
            load = None if ev_total is None else measured.grid_kw + measured.pv_kw - measured.battery_kw - ev_total
        body.update(
            {
                # Observing (--observe), the setpoints below are what would be written: nothing is.
                "controller_state": "observing" if runtime.observe else "safe_state" if setpoints.safe_state
                else "running",
                "grid_power_kw": _r(measured.grid_kw),
                "pv_power_kw": _r(measured.pv_kw),
                "battery_power_kw": _r(measured.battery_kw),
                "battery_soc_pct": None if measured.soc is None else round(100 * measured.soc, 2),
                "ev_power_kw": _r(ev_total),
                "load_power_kw": _r(load),
                "ev_power_by_charger_kw": {name: _r(kw) for name, kw in measured.ev_kw.items()},
                "ev_connected": dict(measured.ev_connected),
                "setpoint_battery_kw": _r(setpoints.battery_kw),
                "setpoint_pv_limit_kw": _r(setpoints.pv_limit_kw),
                "setpoint_ev_current_a": {name: _r(a, 1) for name, a in setpoints.ev_current_a.items()},
                "safety_actions": list(setpoints.actions),
            }
        )
    body["month_peak_import_kw"] = _r(runtime.month_peak_kw)
    body["import_limit_kw"] = runtime.site.import_limit_kw
    body["export_limit_kw"] = runtime.site.export_limit_kw
    counters = asdict(runtime.counters)
    body.update({key: round(value, 4) for key, value in counters.items()})
    return body


def health_payload(runtime: Runtime, mqtt_dropped: int = 0, commands: dict[str, int] | None = None) -> dict[str, Any]:
    devices: dict[str, Any] = {}
    for name, bus_name in runtime.bus_of.items():
        health = runtime.buses[bus_name].health(name)
        driver = runtime.drivers[name]
        devices[name] = {
            "bus": bus_name,
            "state": str(health.state),
            "consecutive_failures": health.consecutive_failures,
            "last_error": health.last_error,
            "recoveries": health.recoveries,
            # Readings outside the map's plausible range, dropped as unknown: per quantity, and which
            # quantities are implausible right now.
            "implausible_readings": driver.implausible_counts(),
            "implausible_now": sorted(driver.implausible_now()),
        }
    return {
        "ts": runtime.clock.local().isoformat(timespec="seconds"),
        "devices": devices,
        "buses": {name: asdict(bus.stats) | {"port": asdict(bus.port_health())} for name, bus in runtime.buses.items()},
        "safe_state_ticks": runtime.stats.safe_state_ticks,
        "write_failures": runtime.stats.write_failures,
        # The time series: its writer thread's state, rows queued, written and dropped, the last error.
        "storage": None if runtime.store is None else runtime.store.health(),
        # Background jobs restarted after a failure (planner, MQTT, live view, tuning follower).
        "restarts": dict(runtime.stats.restarts),
        "plans_failed": runtime.stats.plans_failed,
        # Ticks beyond each limit after correction (total, longest run, kWh), avoidable or not.
        "import_breaches": runtime.stats.import_breaches.to_json(),
        "export_breaches": runtime.stats.export_breaches.to_json(),
        "battery_response_kw_per_s": round(runtime.battery_response.kw_per_s, 2),
        "mqtt_status_dropped": mqtt_dropped,
        # Tuning commands since start: received, accepted, refused, failed (our exception), retained_ignored.
        "mqtt_commands": commands or {},
    }


def plan_payload(runtime: Runtime) -> dict[str, Any] | None:
    plan, start = runtime.plan, runtime.plan_start
    if plan is None or start is None:
        return None
    summary = {k: v for k, v in plan.to_json().items() if k != "steps"}
    summary["start"] = start.isoformat(timespec="minutes")
    summary["step_minutes"] = plan.step_minutes
    summary["battery_kw"] = [round(float(x), 2) for x in plan.battery_kw]
    summary["grid_import_kw"] = [round(float(x), 2) for x in plan.grid_import_kw]
    summary["soc"] = [round(float(x), 4) for x in plan.soc]
    return summary


@dataclass(frozen=True, slots=True)
class Sensor:
    key: str  # the key in the state payload
    name: str
    unit: str | None
    device_class: str | None
    state_class: str | None


# The Energy dashboard takes energy sensors with device_class energy and state_class total_increasing;
# money is `monetary` with state_class `total` (HA refuses total_increasing for it).
SENSORS: tuple[Sensor, ...] = (
    Sensor("grid_power_kw", "Grid power", "kW", "power", "measurement"),
    Sensor("pv_power_kw", "PV power", "kW", "power", "measurement"),
    Sensor("battery_power_kw", "Battery power", "kW", "power", "measurement"),
    Sensor("load_power_kw", "Site load", "kW", "power", "measurement"),
    Sensor("ev_power_kw", "EV charging power", "kW", "power", "measurement"),
    Sensor("battery_soc_pct", "Battery state of charge", "%", "battery", "measurement"),
    Sensor("month_peak_import_kw", "Month peak import (15 min)", "kW", "power", "measurement"),
    Sensor("grid_import_kwh", "Grid import", "kWh", "energy", "total_increasing"),
    Sensor("grid_export_kwh", "Grid export", "kWh", "energy", "total_increasing"),
    Sensor("pv_kwh", "PV production", "kWh", "energy", "total_increasing"),
    Sensor("battery_charge_kwh", "Battery charged", "kWh", "energy", "total_increasing"),
    Sensor("battery_discharge_kwh", "Battery discharged", "kWh", "energy", "total_increasing"),
    Sensor("ev_kwh", "EV energy", "kWh", "energy", "total_increasing"),
    Sensor("energy_cost_cny", "Energy cost", "CNY", "monetary", "total"),
    Sensor("carbon_kg", "Grid CO2", "kg", "weight", "total_increasing"),
    Sensor("carbon_avoided_kg", "CO2 avoided", "kg", "weight", "total_increasing"),
    Sensor("controller_state", "Controller state", None, None, None),
)


def discovery_messages(site: SiteConfig, topics: Topics) -> list[tuple[str, bytes]]:
    """Retained config messages, one per sensor, for `<discovery prefix>/sensor/<node>/<key>/config`."""
    node = f"greensite_{site.site.id}".replace("-", "_")
    device = {
        "identifiers": [node],
        "name": site.site.name,
        "manufacturer": "greensite",
        "model": "edge controller",
        "sw_version": SOFTWARE_VERSION,
    }
    messages = []
    for sensor in SENSORS:
        config: dict[str, Any] = {
            "name": sensor.name,
            "unique_id": f"{node}_{sensor.key}",
            "state_topic": topics.state,
            "value_template": f"{{{{ value_json.{sensor.key} }}}}",
            "availability_topic": topics.availability,
            "payload_available": "online",
            "payload_not_available": "offline",
            "device": device,
        }
        if sensor.unit is not None:
            config["unit_of_measurement"] = sensor.unit
        if sensor.device_class is not None:
            config["device_class"] = sensor.device_class
        if sensor.state_class is not None:
            config["state_class"] = sensor.state_class
        topic = f"{site.mqtt.ha_discovery_prefix}/sensor/{node}/{sensor.key}/config"
        messages.append((topic, json.dumps(config).encode()))
    return messages
