"""Settings (SPEC §9, seeds 001/002): ``TELEMETRA_*`` names, the seeds' plain names, URL rewriting to the
async drivers, and refusals that stop a bad deployment at start rather than at the first request."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from pydantic import AliasChoices, ValidationError

from telemetra.config import MIN_ADMIN_KEY_LENGTH, Settings, settings_errors

STRONG = secrets.token_urlsafe(MIN_ADMIN_KEY_LENGTH)  # made at run time: no key in the repository


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the machine running the tests has set (HOST, PORT, DATABASE_URL…) must not leak in."""
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names = alias.choices if isinstance(alias, AliasChoices) else []
        for name in names:
            if isinstance(name, str):
                monkeypatch.delenv(name, raising=False)


def load() -> Settings:
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_defaults() -> None:
    s = load()
    assert (s.env, s.host, s.port, s.log_level, s.log_format) == ("development", "0.0.0.0", 8000, "INFO", "console")
    assert s.database_url is None and s.is_sqlite
    assert s.effective_database_url == f"sqlite+aiosqlite:///{(Path('telemetra-data') / 'telemetra.db').resolve()}"
    assert s.admin_keys == [] and s.device_api_keys == [] and s.all_admin_keys == []
    assert s.mqtt_presets == ["default"] and s.mqtt_prefix == "telemetra"
    assert s.allow_anonymous_nodes is False and s.gateway_auto_register is True
    assert (s.storage_budget_bytes, s.storage_warn_fraction, s.storage_clear_margin) == (0, 0.9, 0.05)


def test_a_clear_margin_past_a_share_turned_off_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEMETRA_STORAGE_WARN_FRACTION", "0")
    monkeypatch.setenv("TELEMETRA_STORAGE_CLEAR_MARGIN", "0.5")
    assert load().storage_clear_margin == 0.5


@pytest.mark.parametrize(
    ("name", "value", "attribute", "expected"),
    [
        ("TELEMETRA_HOST", "127.0.0.1", "host", "127.0.0.1"),
        ("HOST", "10.0.0.1", "host", "10.0.0.1"),
        ("TELEMETRA_PORT", "9000", "port", 9000),
        ("PORT", "8080", "port", 8080),
        ("LOG_LEVEL", "DEBUG", "log_level", "DEBUG"),
        ("TELEMETRA_LOG_LEVEL", "WARNING", "log_level", "WARNING"),
        ("LOG_FORMAT", "json", "log_format", "json"),
        ("DB_POOL_SIZE", "25", "db_pool_size", 25),
        ("WS_HEARTBEAT_INTERVAL", "12.5", "ws_heartbeat_interval", 12.5),
        ("APP_ENV", "staging", "env", "staging"),
        ("TELEMETRA_DATA_DIR", "/var/lib/telemetra", "data_dir", Path("/var/lib/telemetra")),
        ("TELEMETRA_MAX_PAYLOAD_BYTES", "4096", "max_payload_bytes", 4096),
        ("TELEMETRA_ALLOW_ANONYMOUS_NODES", "true", "allow_anonymous_nodes", True),
        ("TELEMETRA_MQTT_PREFIX", "paku", "mqtt_prefix", "paku"),
        ("TELEMETRA_MQTT_PRESETS", "paku, heatpump", "mqtt_presets", ["paku", "heatpump"]),
        ("DEVICE_API_KEYS", "key-one, key-two,,key-three ", "device_api_keys", ["key-one", "key-two", "key-three"]),
        ("TELEMETRA_DEVICE_API_KEYS", "solo", "device_api_keys", ["solo"]),
        ("TELEMETRA_ADMIN_KEYS", "a1,a2", "admin_keys", ["a1", "a2"]),
        ("TELEMETRA_MQTT_PRESETS", "paku-iot", "mqtt_presets", ["paku-iot"]),
        ("TELEMETRA_OPERATOR_KEYS", "o1, o2", "operator_keys", ["o1", "o2"]),
        ("TELEMETRA_VIEWER_KEYS", "v1", "viewer_keys", ["v1"]),
        ("TELEMETRA_TRUSTED_NETWORKS", "192.168.1.0/24, fd00::/8", "trusted_networks", ["192.168.1.0/24", "fd00::/8"]),
        ("TELEMETRA_TRUSTED_ROLE", "operator", "trusted_role", "operator"),
        (
            "TELEMETRA_CORS_ORIGINS",
            "http://a.local,http://b.local",
            "cors_origins",
            ["http://a.local", "http://b.local"],
        ),
        ("TELEMETRA_REJECTED_PER_MINUTE", "3", "rejected_per_minute", 3),
        ("TELEMETRA_STORAGE_WARN_FRACTION", "0.75", "storage_warn_fraction", 0.75),
        ("TELEMETRA_STORAGE_WARN_DAYS", "30", "storage_warn_days", 30.0),
        ("TELEMETRA_STORAGE_CLEAR_MARGIN", "0.1", "storage_clear_margin", 0.1),
    ],
)
def test_environment_names(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, attribute: str, expected: object
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(load(), attribute) == expected


def test_telemetra_name_wins_over_the_seed_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("TELEMETRA_PORT", "9000")
    assert load().port == 9000


def test_api_secret_key_is_an_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_SECRET_KEY", "seed-secret")
    monkeypatch.setenv("TELEMETRA_ADMIN_KEYS", "mine")
    assert load().all_admin_keys == ["mine", "seed-secret"]


def test_seed_001_lower_case_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "info")
    assert load().log_level == "INFO"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db:5432/telemetry", "postgresql+asyncpg://u:p@db:5432/telemetry"),
        ("postgresql://u:p@db/telemetry", "postgresql+asyncpg://u:p@db/telemetry"),
        ("postgresql+asyncpg://u@db/t", "postgresql+asyncpg://u@db/t"),
        ("sqlite:///./dev.db", "sqlite+aiosqlite:///./dev.db"),
        ("sqlite+aiosqlite:///./dev.db", "sqlite+aiosqlite:///./dev.db"),
    ],
)
@pytest.mark.parametrize("name", ["DATABASE_URL", "TELEMETRA_DATABASE_URL"])
def test_database_urls_are_rewritten_to_async_drivers(
    monkeypatch: pytest.MonkeyPatch, name: str, given: str, expected: str
) -> None:
    monkeypatch.setenv(name, given)
    s = load()
    assert s.database_url == expected
    assert s.effective_database_url == expected
    assert s.is_sqlite == expected.startswith("sqlite")


def test_empty_database_url_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "")
    assert load().database_url is None


@pytest.mark.parametrize(
    "url", ["mysql://u@db/t", "postgresql+psycopg2://u@db/t", "sqlite+pysqlite:///x.db", "telemetry.db"]
)
def test_unknown_database_scheme_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    with pytest.raises(ValidationError, match="must be a postgresql:// or sqlite://"):
        load()


@pytest.mark.parametrize("env", ["production", "staging"])
def test_weak_admin_key_refused_outside_development(monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv("TELEMETRA_ENV", env)
    monkeypatch.setenv("TELEMETRA_ADMIN_KEYS", f"{STRONG},weak-0xA1")
    with pytest.raises(ValidationError, match=f"at least {MIN_ADMIN_KEY_LENGTH} characters") as exc:
        load()
    # The messages (what the CLI prints) never echo the key itself.
    assert all("weak-0xA1" not in e["msg"] for e in exc.value.errors())
    monkeypatch.setenv("TELEMETRA_ADMIN_KEYS", STRONG)
    monkeypatch.setenv("API_SECRET_KEY", "change-me")  # seed 001's placeholder counts too
    with pytest.raises(ValidationError):
        load()
    monkeypatch.delenv("API_SECRET_KEY")
    assert load().all_admin_keys == [STRONG]


def test_weak_admin_key_is_fine_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEMETRA_ADMIN_KEYS", "dev")
    monkeypatch.setenv("API_SECRET_KEY", "x")
    assert load().all_admin_keys == ["dev", "x"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TELEMETRA_MQTT_PRESETS", "default,zigbee"),
        ("TELEMETRA_MQTT_PREFIX", "a/b"),
        ("TELEMETRA_MQTT_PREFIX", "$SYS"),
        ("TELEMETRA_MQTT_PREFIX", "+"),
        ("TELEMETRA_ENV", "prod"),
        ("PORT", "70000"),
        ("PORT", "http"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("DB_POOL_SIZE", "0"),
        ("WS_HEARTBEAT_INTERVAL", "0"),
        ("TELEMETRA_INGEST_QUEUE_MAX_POINTS", "10"),
        ("TELEMETRA_MAX_PAYLOAD_BYTES", "100"),
        ("TELEMETRA_STORAGE_WARN_FRACTION", "1.5"),
        ("TELEMETRA_STORAGE_CLEAR_MARGIN", "1"),
        ("TELEMETRA_STORAGE_CLEAR_MARGIN", "-0.05"),
        ("TELEMETRA_STORAGE_CLEAR_MARGIN", "0.9"),  # not below the warning's share (0.9): never clears
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        load()


def test_unknown_preset_message_lists_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEMETRA_MQTT_PRESETS", "zigbee")
    with pytest.raises(ValidationError, match="zigbee") as exc:
        load()
    assert "heatpump" in str(exc.value)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"DATABASE_URL": "mysql://u@db/t"}, "DATABASE_URL: must be a postgresql:// or sqlite:// URL"),
        ({"TELEMETRA_PORT": "http"}, "TELEMETRA_PORT: input should be a valid integer"),
        ({"PORT": "70000"}, "PORT: input should be less than or equal to 65535 (got '70000')"),  # as it was set
        ({"TELEMETRA_MQTT_PREFIX": "a/b"}, "TELEMETRA_MQTT_PREFIX: must be one topic level"),
        ({"TELEMETRA_MQTT_PRESETS": "paku,paku-iot"}, "TELEMETRA_MQTT_PRESETS / TELEMETRA_MQTT_ROUTES: MQTT routes"),
        (
            {"TELEMETRA_STORAGE_WARN_FRACTION": "0.5", "TELEMETRA_STORAGE_CLEAR_MARGIN": "0.6"},
            "TELEMETRA_STORAGE_CLEAR_MARGIN: must be less than TELEMETRA_STORAGE_WARN_FRACTION (0.5)",
        ),
        ({"TELEMETRA_STORAGE_CLEAR_MARGIN": "1"}, "TELEMETRA_STORAGE_CLEAR_MARGIN: input should be less than 1"),
        (
            {"TELEMETRA_ENV": "production", "TELEMETRA_ADMIN_KEYS": "weak-0xA1"},
            "TELEMETRA_ADMIN_KEYS / TELEMETRA_OPERATOR_KEYS / TELEMETRA_VIEWER_KEYS: keys must be at least",
        ),
    ],
)
def test_refusals_read_as_the_setting_and_what_is_wrong(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], line: str
) -> None:
    """What the CLI prints: the variable's name and the reason, not pydantic's "Value error, …"."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as exc:
        load()
    (message,) = settings_errors(exc.value, env)
    assert message.startswith(line), message
    assert "Value error" not in message and "weak-0xA1" not in message


def test_env_file_is_read_when_asked(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("DATABASE_URL=postgres://u@db/t\nDEVICE_API_KEYS=a,b\nTELEMETRA_PORT=8123\n")
    s = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert (s.database_url, s.device_api_keys, s.port) == ("postgresql+asyncpg://u@db/t", ["a", "b"], 8123)


@pytest.mark.parametrize(
    "placeholder",
    [
        "change-me-to-a-long-random-string-0123456789",
        "your-admin-key-goes-here-0123456789abc",  # pragma: allowlist secret
        "x" * 40,
    ],
)
def test_placeholder_keys_refused_outside_development(monkeypatch: pytest.MonkeyPatch, placeholder: str) -> None:
    monkeypatch.setenv("TELEMETRA_ENV", "production")
    monkeypatch.setenv("TELEMETRA_ADMIN_KEYS", placeholder)
    with pytest.raises(ValidationError, match="TELEMETRA_ADMIN_KEYS: placeholder or example secret") as exc:
        load()
    assert all(placeholder not in e["msg"] for e in exc.value.errors())
    monkeypatch.setenv("TELEMETRA_ADMIN_KEYS", STRONG)
    monkeypatch.setenv("TELEMETRA_MQTT_URL", "mqtt://svc:changeme@broker:1883")  # pragma: allowlist secret
    with pytest.raises(ValidationError, match="TELEMETRA_MQTT_URL: placeholder"):
        load()
    monkeypatch.setenv("TELEMETRA_ENV", "development")
    assert load().mqtt_url == "mqtt://svc:changeme@broker:1883"  # pragma: allowlist secret


def test_unknown_names_get_the_closest_setting() -> None:
    from telemetra.config import unknown_settings

    warnings = unknown_settings(
        {"TELEMETRA_ADMIN_KEY": "x", "TELEMETRA_PORT": "1", "TELEMETRA_TEST_PG_URL": "x", "PATH": "/bin"},
        ["PORT", "TELEMETRA_MQTT_PROT", "ZZZ"],
    )
    assert warnings == [
        "unknown environment variable TELEMETRA_ADMIN_KEY is ignored; did you mean TELEMETRA_ADMIN_KEYS?",
        "unknown .env key TELEMETRA_MQTT_PROT is ignored; did you mean TELEMETRA_MQTT_PORT?",
        "unknown .env key ZZZ is ignored (see the configuration table in the README)",
    ]


def test_file_secrets(tmp_path: Path) -> None:
    from telemetra.config import file_values

    key = secrets.token_urlsafe(32)
    (tmp_path / "admin").write_text(key + "\n")
    values = file_values(
        {"TELEMETRA_ADMIN_KEYS_FILE": str(tmp_path / "admin"), "TELEMETRA_OTA_SIGNING_KEY_FILE": "/a/path"}
    )
    assert values == {"admin_keys": key}  # OTA_SIGNING_KEY_FILE is a setting of its own
    with pytest.raises(ValueError, match="TELEMETRA_DATABASE_URL_FILE=/nope: cannot read"):
        file_values({"TELEMETRA_DATABASE_URL_FILE": "/nope"})


def test_the_readme_configuration_table_lists_every_setting() -> None:
    """Each setting's TELEMETRA_ name is in the README's table (``/ `_SUFFIX``` shorthand for its
    neighbours: ``TELEMETRA_TLS_CERT`` / ``_KEY``), and the table names no setting that does not exist."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = text[text.index("## Configuration") : text.index("## Operations")]
    listed: set[str] = set()
    named: set[str] = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        base = ""
        for token in re.findall(r"`([A-Z0-9_]+)`", row.split("|")[1]):
            if token.startswith("TELEMETRA_"):
                base = token
                listed.add(token)
                named.add(token)
            elif token.startswith("_") and base:
                parts = base.split("_")
                listed.update("_".join(parts[:k]) + token for k in range(1, len(parts)))
    names = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else []
        names.update(c for c in choices if isinstance(c, str) and c.startswith("TELEMETRA_"))
    assert sorted(names - listed) == []
    assert sorted(named - names) == []
