"""Settings: one class, read once at the edge (CLI or test), validated, then passed in.

Every field reads ``TELEMETRA_<NAME>``; the names documented by seeds 001/002 (``DATABASE_URL``,
``API_SECRET_KEY``, ``DEVICE_API_KEYS``, ``LOG_LEVEL``, ``LOG_FORMAT``, ``DB_POOL_SIZE``,
``WS_HEARTBEAT_INTERVAL``, ``HOST``, ``PORT``, ``APP_ENV``) are accepted as well so their deployments
move over unchanged.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from telemetra.domain.principal import parse_networks
from telemetra.mqtt.presets import build_table

# Admin keys shorter than this are refused outside development: they guard every device's data.
MIN_ADMIN_KEY_LENGTH = 32

CommaList = Annotated[list[str], NoDecode]


def _alias(name: str, *seed_names: str) -> AliasChoices:
    return AliasChoices(f"TELEMETRA_{name}", *seed_names)


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


_KEY_SETTINGS = "TELEMETRA_ADMIN_KEYS / TELEMETRA_OPERATOR_KEYS / TELEMETRA_VIEWER_KEYS"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True, validate_default=True)

    env: Literal["development", "staging", "production"] = Field(
        "development", validation_alias=_alias("ENV", "APP_ENV")
    )
    host: str = Field("0.0.0.0", validation_alias=_alias("HOST", "HOST"))
    port: int = Field(8000, ge=1, le=65535, validation_alias=_alias("PORT", "PORT"))
    data_dir: Path = Field(Path("./telemetra-data"), validation_alias=_alias("DATA_DIR"))
    database_url: str | None = Field(None, validation_alias=_alias("DATABASE_URL", "DATABASE_URL"))
    db_pool_size: int = Field(10, ge=1, le=200, validation_alias=_alias("DB_POOL_SIZE", "DB_POOL_SIZE"))
    # How long `serve` waits at start for PostgreSQL (and its database) and an external broker (bounded
    # backoff, progress in the log), so that compose's start-up order does not matter.
    startup_wait_s: float = Field(60.0, ge=0, le=3600, validation_alias=_alias("STARTUP_WAIT_S"))

    # TLS (issue 11): with a certificate and key, HTTP is HTTPS (with HSTS) and the embedded broker adds an
    # MQTT-over-TLS listener on TELEMETRA_MQTT_TLS_PORT.
    tls_cert: Path | None = Field(None, validation_alias=_alias("TLS_CERT"))
    tls_key: Path | None = Field(None, validation_alias=_alias("TLS_KEY"))
    mqtt_tls_port: int = Field(8883, ge=0, le=65535, validation_alias=_alias("MQTT_TLS_PORT"))

    admin_keys: CommaList = Field(default_factory=list, validation_alias=_alias("ADMIN_KEYS"))
    api_secret_key: str | None = Field(None, validation_alias=AliasChoices("API_SECRET_KEY"))
    device_api_keys: CommaList = Field(
        default_factory=list, validation_alias=_alias("DEVICE_API_KEYS", "DEVICE_API_KEYS")
    )
    # Roles on keys and key-less access (SPEC §1, CLIENTS.md "Clients that send no key").
    operator_keys: CommaList = Field(default_factory=list, validation_alias=_alias("OPERATOR_KEYS"))
    viewer_keys: CommaList = Field(default_factory=list, validation_alias=_alias("VIEWER_KEYS"))
    trusted_networks: CommaList = Field(default_factory=list, validation_alias=_alias("TRUSTED_NETWORKS"))
    trusted_role: Literal["admin", "operator", "viewer"] = Field("viewer", validation_alias=_alias("TRUSTED_ROLE"))
    cors_origins: CommaList = Field(default_factory=list, validation_alias=_alias("CORS_ORIGINS"))
    allow_anonymous_nodes: bool = Field(False, validation_alias=_alias("ALLOW_ANONYMOUS_NODES"))
    gateway_auto_register: bool = Field(True, validation_alias=_alias("GATEWAY_AUTO_REGISTER"))
    claim_code_ttl_s: int = Field(7 * 24 * 3600, ge=60, validation_alias=_alias("CLAIM_CODE_TTL_S"))

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", validation_alias=_alias("LOG_LEVEL", "LOG_LEVEL")
    )
    opentelemetry: bool = Field(False, validation_alias=_alias("OPENTELEMETRY"))
    log_format: Literal["json", "console"] = Field("console", validation_alias=_alias("LOG_FORMAT", "LOG_FORMAT"))
    ws_heartbeat_interval: float = Field(
        30.0, gt=0, validation_alias=_alias("WS_HEARTBEAT_INTERVAL", "WS_HEARTBEAT_INTERVAL")
    )
    # permessage-deflate on the WebSockets: each message compressed per client (CPU per delivery), and the
    # frames built once per event can no longer be shared. Off unless bandwidth matters more.
    ws_compression: bool = Field(False, validation_alias=_alias("WS_COMPRESSION"))
    # Events kept per WebSocket client that reads too slowly; past it the oldest go (and it is told).
    ws_queue_size: int = Field(1000, ge=10, le=1_000_000, validation_alias=_alias("WS_QUEUE_SIZE"))

    # Ingest queue and group commit.
    ingest_queue_max_points: int = Field(200_000, ge=100, validation_alias=_alias("INGEST_QUEUE_MAX_POINTS"))
    ingest_batch_max_points: int = Field(20_000, ge=1, validation_alias=_alias("INGEST_BATCH_MAX_POINTS"))
    ingest_batch_linger_ms: float = Field(2.0, ge=0, validation_alias=_alias("INGEST_BATCH_LINGER_MS"))
    ingest_commits_in_flight: int = Field(2, ge=1, le=16, validation_alias=_alias("INGEST_COMMITS_IN_FLIGHT"))
    ingest_retry_after_s: int = Field(1, ge=1, validation_alias=_alias("INGEST_RETRY_AFTER_S"))

    # Limits on what a device may send (SPEC §4).
    max_payload_bytes: int = Field(256 * 1024, ge=1024, validation_alias=_alias("MAX_PAYLOAD_BYTES"))
    max_batch_messages: int = Field(1000, ge=1, validation_alias=_alias("MAX_BATCH_MESSAGES"))
    max_keys_per_message: int = Field(256, ge=1, validation_alias=_alias("MAX_KEYS_PER_MESSAGE"))
    max_key_length: int = Field(128, ge=8, validation_alias=_alias("MAX_KEY_LENGTH"))
    max_depth: int = Field(8, ge=1, validation_alias=_alias("MAX_DEPTH"))
    max_text_length: int = Field(1024, ge=1, validation_alias=_alias("MAX_TEXT_LENGTH"))
    max_future_skew_s: int = Field(300, ge=0, validation_alias=_alias("MAX_FUTURE_SKEW_S"))
    max_past_age_days: int = Field(3650, ge=1, validation_alias=_alias("MAX_PAST_AGE_DAYS"))
    offline_after_s: int = Field(120, ge=5, validation_alias=_alias("OFFLINE_AFTER_S"))
    # Data lifecycle (issue 10). Rollups off: nothing is merged at ingest and every aggregate reads raw
    # points (turning them on again later leaves a hole: the tiers are filled only by the migration).
    rollups: bool = Field(True, validation_alias=_alias("ROLLUPS"))
    # Days each tier keeps (0: everything); per device model through PUT /api/v1/retention/models/{model}.
    retention_raw_days: int = Field(0, ge=0, le=36500, validation_alias=_alias("RETENTION_RAW_DAYS"))
    retention_1m_days: int = Field(0, ge=0, le=36500, validation_alias=_alias("RETENTION_1M_DAYS"))
    retention_1h_days: int = Field(0, ge=0, le=36500, validation_alias=_alias("RETENTION_1H_DAYS"))
    retention_interval_s: float = Field(3600.0, gt=0, validation_alias=_alias("RETENTION_INTERVAL_S"))
    retention_chunk_rows: int = Field(5000, ge=100, le=1_000_000, validation_alias=_alias("RETENTION_CHUNK_ROWS"))
    storage_budget_bytes: int = Field(0, ge=0, validation_alias=_alias("STORAGE_BUDGET_BYTES"))  # 0: none
    storage_warn_days: float = Field(14.0, ge=0, validation_alias=_alias("STORAGE_WARN_DAYS"))
    # The storage_budget alert also warns once this share of the budget is used, whatever the growth (0: off).
    storage_warn_fraction: float = Field(0.9, ge=0, le=1, validation_alias=_alias("STORAGE_WARN_FRACTION"))
    # Hysteresis, as a share of the budget: an open critical goes down to a warning only below the budget
    # minus this, an open warning clears only this far below what raised it (0: at the thresholds).
    storage_clear_margin: float = Field(0.05, ge=0, lt=1, validation_alias=_alias("STORAGE_CLEAR_MARGIN"))
    rules_file: Path | None = Field(None, validation_alias=_alias("RULES_FILE"))  # JSON or TOML, loaded at start
    presence_sweep_s: float = Field(10.0, gt=0, le=3600, validation_alias=_alias("PRESENCE_SWEEP_S"))
    # An offline alert for any device silent past its interval, even without an offline rule naming it.
    offline_alerts: bool = Field(True, validation_alias=_alias("OFFLINE_ALERTS"))
    # Webhooks (issue 10): signed POSTs of alerts, presence, registry and rollout events.
    webhook_timeout_s: float = Field(10.0, gt=0, le=300, validation_alias=_alias("WEBHOOK_TIMEOUT_S"))
    webhook_max_attempts: int = Field(12, ge=1, le=100, validation_alias=_alias("WEBHOOK_MAX_ATTEMPTS"))
    webhook_retry_base_s: float = Field(10.0, gt=0, le=3600, validation_alias=_alias("WEBHOOK_RETRY_BASE_S"))
    webhook_retry_max_s: float = Field(3600.0, gt=0, le=86400, validation_alias=_alias("WEBHOOK_RETRY_MAX_S"))
    webhook_concurrency: int = Field(4, ge=1, le=64, validation_alias=_alias("WEBHOOK_CONCURRENCY"))
    webhook_log_days: float = Field(7.0, gt=0, le=3650, validation_alias=_alias("WEBHOOK_LOG_DAYS"))
    # Refused MQTT messages kept per device (or per topic root) and minute; the rest are only counted.
    rejected_per_minute: int = Field(10, ge=0, validation_alias=_alias("REJECTED_PER_MINUTE"))

    # MQTT (SPEC §2).
    mqtt_url: str | None = Field(None, validation_alias=_alias("MQTT_URL"))
    mqtt_port: int = Field(1883, ge=0, le=65535, validation_alias=_alias("MQTT_PORT"))
    mqtt_host: str = Field("0.0.0.0", validation_alias=_alias("MQTT_HOST"))
    mqtt_prefix: str = Field("telemetra", validation_alias=_alias("MQTT_PREFIX"))
    mqtt_presets: CommaList = Field(default_factory=lambda: ["default"], validation_alias=_alias("MQTT_PRESETS"))
    mqtt_routes: CommaList = Field(default_factory=list, validation_alias=_alias("MQTT_ROUTES"))
    # Several Telemetra processes on one external broker split the stream through `$share/<group>/…`. Unset
    # (one process) the collector subscribes plainly: Mosquitto 2.0 restores a persistent session's plain
    # subscriptions after a broker restart but not its shared ones (what arrives until we reconnect is lost).
    mqtt_share_group: str | None = Field(None, validation_alias=_alias("MQTT_SHARE_GROUP"))
    # Default: random, kept in the data directory (mqtt/client_id.py). A fixed one must be unguessable.
    mqtt_client_id: str | None = Field(None, validation_alias=_alias("MQTT_CLIENT_ID"))
    # Mosquitto (dynamic security): a device may connect only with its device id as MQTT client id, so no
    # one can take another's session over. Off for devices that use other (or broker-assigned) ids.
    mqtt_bind_client_id: bool = Field(True, validation_alias=_alias("MQTT_BIND_CLIENT_ID"))
    mqtt_tls_ca: Path | None = Field(None, validation_alias=_alias("MQTT_TLS_CA"))
    mqtt_tls_cert: Path | None = Field(None, validation_alias=_alias("MQTT_TLS_CERT"))
    mqtt_tls_key: Path | None = Field(None, validation_alias=_alias("MQTT_TLS_KEY"))
    mqtt_tls_insecure: bool = Field(False, validation_alias=_alias("MQTT_TLS_INSECURE"))
    # The Mosquitto dynamic-security admin (from `mosquitto_ctrl dynsec init`): when set, Telemetra keeps the
    # broker's per-device credentials and ACLs in step with the registry, and creates the service account
    # of TELEMETRA_MQTT_URL.
    mqtt_dynsec_username: str | None = Field(None, validation_alias=_alias("MQTT_DYNSEC_USERNAME"))
    mqtt_dynsec_password: str | None = Field(None, validation_alias=_alias("MQTT_DYNSEC_PASSWORD"))

    # OTA (issue 8): firmware images live on disk, in TELEMETRA_OTA_DIR or <data dir>/firmware.
    ota_dir: Path | None = Field(None, validation_alias=_alias("OTA_DIR"))
    ota_max_firmware_bytes: int = Field(128 * 1024 * 1024, ge=1, validation_alias=_alias("OTA_MAX_FIRMWARE_BYTES"))
    # Ed25519 signing key: PEM (or 32 raw bytes as base64/hex), inline or in a file. Never logged.
    ota_signing_key: SecretStr | None = Field(None, validation_alias=_alias("OTA_SIGNING_KEY"))
    ota_signing_key_file: Path | None = Field(None, validation_alias=_alias("OTA_SIGNING_KEY_FILE"))
    ota_require_key: bool = Field(False, validation_alias=_alias("OTA_REQUIRE_KEY"))
    ota_base_url: str | None = Field(None, validation_alias=_alias("OTA_BASE_URL"))  # what devices download from
    ota_gateway_lease_s: int = Field(120, ge=5, le=86400, validation_alias=_alias("OTA_GATEWAY_LEASE_S"))
    ota_step_s: float = Field(1.0, gt=0, le=60, validation_alias=_alias("OTA_STEP_S"))

    _split = field_validator(
        "admin_keys",
        "device_api_keys",
        "operator_keys",
        "viewer_keys",
        "trusted_networks",
        "cors_origins",
        "mqtt_presets",
        "mqtt_routes",
        mode="before",
    )(_split_commas)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value  # seed 001 documents `info`

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        url = value
        # Seeds' deployments use plain driver names; the async drivers are what we run on.
        for plain, async_ in (
            ("postgres://", "postgresql+asyncpg://"),
            ("postgresql://", "postgresql+asyncpg://"),
            ("sqlite://", "sqlite+aiosqlite://"),
        ):
            if url.startswith(plain):
                url = async_ + url[len(plain) :]
        if not url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("must be a postgresql:// or sqlite:// URL (async drivers asyncpg/aiosqlite)")
        return url

    @field_validator("mqtt_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#/") or value.startswith("$"):
            raise ValueError("must be one topic level without '+', '#', '/' or a leading '$'")
        return value

    @field_validator("mqtt_share_group", mode="before")
    @classmethod
    def _share_group(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip() or None
            if value is not None and any(c in value for c in "+#/"):
                raise ValueError("must be one topic level without '+', '#' or '/'")
        return value

    @field_validator("mqtt_presets")
    @classmethod
    def _known_presets(cls, value: list[str]) -> list[str]:
        known = ("default", "paku", "telemetra", "heatpump", "paku-iot")
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown MQTT preset(s) {unknown}; known: {', '.join(known)}")
        return value

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        parse_networks(value)  # refuses a bad CIDR at start, naming it
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if not value.startswith(("mqtt://", "mqtts://", "tcp://", "ssl://")):
            raise ValueError("must look like mqtt://user:password@host:1883 or mqtts://…")
        return value

    @model_validator(mode="after")
    def _routes_consistent(self) -> Settings:
        # Refused here, at start, rather than when MQTT comes up: conflicting presets or a bad extra route.
        try:
            build_table(self.mqtt_prefix, self.mqtt_presets, self.mqtt_routes)
        except ValueError as exc:
            raise ValueError(f"TELEMETRA_MQTT_PRESETS / TELEMETRA_MQTT_ROUTES: {exc}") from None
        return self

    @model_validator(mode="after")
    def _clear_margin_below_warning(self) -> Settings:
        if self.storage_warn_fraction and self.storage_clear_margin >= self.storage_warn_fraction:
            raise ValueError(
                f"TELEMETRA_STORAGE_CLEAR_MARGIN: must be less than TELEMETRA_STORAGE_WARN_FRACTION"
                f" ({self.storage_warn_fraction:g}), or a warning raised by the share used would never clear"
            )
        return self

    @model_validator(mode="after")
    def _one_signing_key(self) -> Settings:
        if self.ota_signing_key and self.ota_signing_key_file:
            raise ValueError("set TELEMETRA_OTA_SIGNING_KEY or TELEMETRA_OTA_SIGNING_KEY_FILE, not both")
        return self

    @model_validator(mode="after")
    def _dynsec_pair(self) -> Settings:
        if bool(self.mqtt_dynsec_username) != bool(self.mqtt_dynsec_password):
            raise ValueError("set both TELEMETRA_MQTT_DYNSEC_USERNAME and TELEMETRA_MQTT_DYNSEC_PASSWORD, or neither")
        return self

    @model_validator(mode="after")
    def _admin_keys_strong(self) -> Settings:
        roles = (set(self.all_admin_keys), set(self.operator_keys), set(self.viewer_keys))
        if (roles[0] & roles[1]) or (roles[0] & roles[2]) or (roles[1] & roles[2]):
            raise ValueError(
                f"{_KEY_SETTINGS}: a key is listed for two roles (admin, operator, viewer); give each role its own keys"
            )
        staff = [k for keys in roles for k in keys]
        if self.env != "development":
            weak = [k for k in staff if len(k) < MIN_ADMIN_KEY_LENGTH]
            if weak:
                raise ValueError(
                    f"{_KEY_SETTINGS}: keys must be at least {MIN_ADMIN_KEY_LENGTH} characters "
                    "outside development "
                    f"({len(weak)} too short); generate one with: python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))'"
                )
            self._refuse_placeholders()
        return self

    def _refuse_placeholders(self) -> None:
        """The example values of .env.example and the compose files must not reach production."""
        secrets: list[tuple[str, str]] = [("TELEMETRA_ADMIN_KEYS", k) for k in self.all_admin_keys]
        secrets += [("TELEMETRA_OPERATOR_KEYS", k) for k in self.operator_keys]
        secrets += [("TELEMETRA_VIEWER_KEYS", k) for k in self.viewer_keys]
        secrets += [("TELEMETRA_DEVICE_API_KEYS", k) for k in self.device_api_keys]
        if self.mqtt_dynsec_password:
            secrets.append(("TELEMETRA_MQTT_DYNSEC_PASSWORD", self.mqtt_dynsec_password))
        for name, url in (("TELEMETRA_DATABASE_URL", self.database_url), ("TELEMETRA_MQTT_URL", self.mqtt_url)):
            password = _url_password(url)
            if password:
                secrets.append((name, password))
        bad = sorted({name for name, value in secrets if is_placeholder(value)})
        if bad:
            raise ValueError(
                f"{', '.join(bad)}: placeholder or example secret outside development (TELEMETRA_ENV={self.env}); "
                "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )

    @property
    def all_admin_keys(self) -> list[str]:
        keys = list(self.admin_keys)
        if self.api_secret_key:
            keys.append(self.api_secret_key)
        return keys

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'telemetra.db').resolve()}"

    @property
    def firmware_dir(self) -> Path:
        return self.ota_dir or self.data_dir / "firmware"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")


# Words that mark a value as an example, not a secret (what .env.example files and tutorials put there).
_PLACEHOLDER_WORDS = (
    "changeme", "change-me", "change_me", "replace", "example", "placeholder", "your-", "your_", "yourkey",
    "xxxx", "todo", "dummy", "sample", "fill-in", "insert", "<", ">", "secret-key", "password123",
)  # fmt: skip


def is_placeholder(value: str) -> bool:
    lowered = value.lower()
    return any(word in lowered for word in _PLACEHOLDER_WORDS) or len(set(value)) < 6


def _url_password(url: str | None) -> str | None:
    if not url or "://" not in url:
        return None
    from urllib.parse import unquote, urlsplit

    password = urlsplit(url).password
    return unquote(password) if password else None


# TELEMETRA_* names that are not settings but are read by the test suite and bench/.
_NOT_SETTINGS_PREFIXES = ("TELEMETRA_TEST_", "TELEMETRA_BENCH_", "TELEMETRA_FUZZ_")


def known_names() -> dict[str, str]:
    """Every name a setting answers to (``TELEMETRA_…`` and the seeds' aliases) → its field."""
    names: dict[str, str] = {}
    for field_name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias or field_name]
        for choice in choices:
            if isinstance(choice, str):
                names[choice.upper()] = field_name
    for name in list(names):
        if name.startswith("TELEMETRA_") and not name.endswith("_FILE"):
            names.setdefault(name + "_FILE", names[name])  # secrets from files (file_values)
    return names


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a .env file (comments, blank lines and `export ` ignored)."""
    values: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def unknown_settings(environ: Mapping[str, str], env_file_keys: Iterable[str] = ()) -> list[str]:
    """One warning per ``TELEMETRA_*`` variable (and ``.env`` key) that no setting reads, naming the closest
    known setting: a typo must not be silently ignored."""
    known = known_names()
    telemetra_names = sorted(n for n in known if n.startswith("TELEMETRA_"))
    warnings = []
    candidates = [("environment variable", n) for n in environ if n.upper().startswith("TELEMETRA_")]
    candidates += [(".env key", n) for n in env_file_keys]
    for where, name in candidates:
        upper = name.upper()
        if upper in known or upper.startswith(_NOT_SETTINGS_PREFIXES):
            continue
        # Compared without the common prefix, which would make every name look alike.
        short = {n.removeprefix("TELEMETRA_"): n for n in telemetra_names}
        close = difflib.get_close_matches(upper.removeprefix("TELEMETRA_"), list(short), n=1, cutoff=0.7)
        hint = f"; did you mean {short[close[0]]}?" if close else " (see the configuration table in the README)"
        warnings.append(f"unknown {where} {name} is ignored{hint}")
    return warnings


def file_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """``TELEMETRA_<NAME>_FILE=/run/secrets/x``: the setting's value read from that file (compose and
    Kubernetes secrets), trailing newline dropped. A setting that is itself a path (…_KEY_FILE) is not one."""
    real = {n: f for n, f in known_names().items() if not n.endswith("_FILE") or f.endswith("_file")}
    values: dict[str, Any] = {}
    for name, path in environ.items():
        upper = name.upper()
        if not upper.startswith("TELEMETRA_") or not upper.endswith("_FILE") or upper in real:
            continue
        field = real.get(upper.removesuffix("_FILE"))
        if field is None:
            continue
        try:
            values[field] = Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{name}={path}: cannot read the file ({exc.strerror})") from None
    return values


def process_environ() -> Mapping[str, str]:
    return os.environ


_SECRET_WORDS = ("KEY", "PASSWORD", "SECRET", "TOKEN", "URL")


def settings_errors(exc: ValidationError, environ: Mapping[str, str]) -> list[str]:
    """One line per refused setting, ``NAME: what is wrong``, naming the variable as it was set (``PORT`` or
    ``TELEMETRA_PORT``) — not pydantic's ``Value error, …`` wording; a secret's value is never echoed."""
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        if error["type"] == "value_error":
            message = str(error.get("ctx", {}).get("error", error["msg"]))
        else:
            message = error["msg"]
            message = message[:1].lower() + message[1:]
        if not loc:
            lines.append(message)  # a check across settings: its message names them
            continue
        name = _as_set(loc[0], environ)
        if error["type"] != "value_error" and not any(word in name.upper() for word in _SECRET_WORDS):
            given = error.get("input")
            if isinstance(given, str | int | float) and len(str(given)) <= 80:
                message += f" (got {str(given)!r})"
        lines.append(f"{name}: {message}")
    return lines


def _as_set(name: str, environ: Mapping[str, str]) -> str:
    """The name among a setting's aliases that the environment really sets (the seeds' ``PORT`` …)."""
    names = known_names()
    field = names.get(name.upper())
    if field is None or name in environ:
        return name
    for other in environ:
        if names.get(other.upper()) == field and not other.upper().endswith("_FILE"):
            return other
    return name
