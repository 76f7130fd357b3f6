"""MQTT: live status, Home Assistant discovery, remote tuning, and the embedded broker."""

from controller.mqtt._broker import embedded_broker, port_is_free
from controller.mqtt._payloads import SENSORS, Sensor, Topics, discovery_messages, health_payload, state_payload
from controller.mqtt._service import Backoff, MqttService, Outbox, broker_address
from controller.mqtt._wiring import site_services

__all__ = [
    "SENSORS",
    "Backoff",
    "MqttService",
    "Outbox",
    "Sensor",
    "Topics",
    "broker_address",
    "discovery_messages",
    "embedded_broker",
    "health_payload",
    "port_is_free",
    "site_services",
    "state_payload",
]
