"""Telemetra: a self-hosted IoT telemetry backend."""

__version__ = "0.1.0"
