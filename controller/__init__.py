"""The asyncio runtime: control loop, safety layer, MQTT, storage and CLI."""
