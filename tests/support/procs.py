"""What every test that starts a process or a listener needs: a free port, and an environment without
the settings a developer's shell or CI may carry (``TELEMETRA_*`` and the legacy names the replaced
systems read), so the child does only what the test says."""

from __future__ import annotations

import os
import socket

LEGACY_SETTING_NAMES = frozenset(
    {
        "DATABASE_URL",
        "API_SECRET_KEY",
        "DEVICE_API_KEYS",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "DB_POOL_SIZE",
        "WS_HEARTBEAT_INTERVAL",
        "HOST",
        "PORT",
        "APP_ENV",
    }
)


def free_port() -> int:
    """A port that was free a moment ago (whoever binds it later may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environ() -> dict[str, str]:
    """This process's environment without any setting Telemetra would read."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k not in LEGACY_SETTING_NAMES}
