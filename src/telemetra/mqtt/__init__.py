"""MQTT side of Telemetra: topic ACL, embedded broker, collector, downlink."""
