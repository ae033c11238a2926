"""deploy/: the compose files as ``docker-compose config`` reads them (the Debian package), and what a
production deployment relies on — no host port per replica, secrets only from files, healthchecks with
start periods, Mosquitto with TLS and dynamic security, PostgreSQL with a volume and backups, Grafana
provisioned with a PostgreSQL data source and a dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import missing_service

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
# Made by deploy/make-secrets.sh on the host, not shipped.
GENERATED = ("secrets", "certs", "backups", "mosquitto/data")


def compose_config(name: str, env_file: Path | None = None) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    if binary is None:
        missing_service("docker-compose not installed (apt-get install docker-compose)")
        raise AssertionError("unreachable")
    options = ["--env-file", str(env_file)] if env_file else []
    done = subprocess.run(
        [binary, "-f", str(DEPLOY / name), *options, "config"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def target_ports(service: dict[str, Any]) -> set[int]:
    """Container ports, whichever form docker-compose gives them in (a mapping, or "ip:host:container")."""
    return {
        int(p["target"]) if isinstance(p, dict) else int(str(p).rsplit(":", 1)[-1].split("/")[0])
        for p in service.get("ports", [])
    }


def bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith("/"):
            sources.append(source)
    return sources


@pytest.fixture(scope="module")
def prod() -> dict[str, Any]:
    return compose_config("compose.prod.yaml")


def test_prod_services_and_healthchecks(prod: dict[str, Any]) -> None:
    services = prod["services"]
    assert set(services) == {"proxy", "telemetra", "postgres", "backup", "mosquitto", "grafana"}
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check.get("test") and check.get("start_period"), f"{name}: healthcheck with start_period"
    assert services["grafana"]["profiles"] == ["grafana"]


def test_replicas_behind_the_tls_proxy(prod: dict[str, Any]) -> None:
    telemetra, proxy = prod["services"]["telemetra"], prod["services"]["proxy"]
    assert "ports" not in telemetra  # no fixed host port per replica: only the proxy reaches them
    assert int(telemetra["deploy"]["replicas"]) >= 2
    assert telemetra["environment"]["TELEMETRA_MQTT_SHARE_GROUP"] == "telemetra"
    assert target_ports(proxy) == {80, 443}
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert "listen 443 ssl" in nginx and "ssl_certificate " in nginx and "Strict-Transport-Security" in nginx
    assert "resolver 127.0.0.11" in nginx and "http://telemetra:8000" in nginx  # every replica, re-resolved


def test_secrets_come_from_files(prod: dict[str, Any]) -> None:
    assert all("file" in secret for secret in prod["secrets"].values())
    for name, service in prod["services"].items():
        env = service.get("environment", {})
        for key, value in env.items():
            assert not any(word in key for word in ("PASSWORD", "KEYS", "SECRET")) or key.endswith("_FILE"), (
                f"{name}: {key} must be read from a file"
            )
            assert "://" not in str(value) or "@" not in str(value), f"{name}: {key} holds credentials"
        for key in (k for k in env if k.endswith("_FILE")):
            secret = env[key].removeprefix("/run/secrets/")
            assert secret in [s if isinstance(s, str) else s["source"] for s in service["secrets"]], (name, key)
    env = prod["services"]["telemetra"]["environment"]
    assert env["TELEMETRA_ENV"] == "production"  # so placeholder and weak keys are refused
    script = (DEPLOY / "make-secrets.sh").read_text()
    for secret in prod["secrets"]:
        assert f"keep {secret} " in script, f"make-secrets.sh does not make {secret}"


def test_mosquitto_with_tls_and_dynamic_security(prod: dict[str, Any]) -> None:
    mosquitto = prod["services"]["mosquitto"]
    assert 8883 in target_ports(mosquitto)
    targets = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in mosquitto["volumes"]}
    assert {"/mosquitto/config/conf.d", "/mosquitto/certs", "/mosquitto/data"} <= targets
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert "include_dir /mosquitto/config/conf.d" in conf and "mosquitto_dynamic_security.so" in conf
    tls = (DEPLOY / "mosquitto" / "conf.d" / "tls.conf").read_text()
    assert "listener 8883" in tls and "certfile /mosquitto/certs/server.crt" in tls


def host_bindings(service: dict[str, Any]) -> dict[int, str]:
    """Container port → the host address it is published on ("" for every interface)."""
    bindings = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            bindings[int(port["target"])] = port.get("host_ip", "")
        else:
            parts = str(port).split("/")[0].split(":")
            bindings[int(parts[-1])] = parts[0] if len(parts) == 3 else ""
    return bindings


def test_plain_mqtt_and_websocket_stay_on_loopback_and_wss_goes_through_the_proxy(prod: dict[str, Any]) -> None:
    mosquitto = prod["services"]["mosquitto"]
    assert host_bindings(mosquitto) == {8883: "", 1883: "127.0.0.1", 9001: "127.0.0.1"}  # only TLS is public
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    mqtt = re.search(r"location = /mqtt \{(.*?)\}", nginx, re.S)
    assert mqtt, "nginx.conf: no location for wss://<host>/mqtt"
    block = mqtt.group(1)
    assert "http://mosquitto:9001" in block and "proxy_http_version 1.1" in block
    assert "Upgrade $http_upgrade" in block and "Connection $connection_upgrade" in block
    assert "mosquitto" in prod["services"]["proxy"]["depends_on"]
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 9001\nprotocol websockets$", conf, re.M)


def test_env_example_keeps_the_same_bindings() -> None:
    """With deploy/.env.example (what the README copies to deploy/.env), the host bindings are the same."""
    prod = compose_config("compose.prod.yaml", DEPLOY / ".env.example")
    assert host_bindings(prod["services"]["mosquitto"]) == {8883: "", 1883: "127.0.0.1", 9001: "127.0.0.1"}
    assert host_bindings(prod["services"]["grafana"]) == {3000: "127.0.0.1"}
    assert int(prod["services"]["telemetra"]["deploy"]["replicas"]) == 2


# In deploy/.env.example but not passed on to Telemetra: compose's own, or needing more than a value.
NOT_PASSED_ON = {
    "TELEMETRA_REPLICAS": "compose's own: how many replicas",
    "TELEMETRA_RULES_FILE": "a path in the container: needs the file mounted too (an override file)",
}


def test_every_setting_in_env_example_reaches_telemetra(tmp_path: Path, prod: dict[str, Any]) -> None:
    """deploy/.env only fills in compose's ${…}: a setting it offers that the telemetra service does not
    pass on would silently do nothing. Each one reaches the container as set, and unset it is the
    server's own default."""
    from telemetra.config import Settings, known_names

    text = (DEPLOY / ".env.example").read_text()
    names = sorted(set(re.findall(r"^#?\s*(TELEMETRA_[A-Z0-9_]+)=", text, re.M)) - set(NOT_PASSED_ON))
    assert "TELEMETRA_STORAGE_CLEAR_MARGIN" in names and "TELEMETRA_STORAGE_WARN_FRACTION" in names
    env = tmp_path / ".env"
    env.write_text("".join(f"{name}=value-{i}\n" for i, name in enumerate(names)))
    passed_on = compose_config("compose.prod.yaml", env)["services"]["telemetra"]["environment"]
    assert {n: passed_on.get(n) for n in names} == {n: f"value-{i}" for i, n in enumerate(names)}
    unset = prod["services"]["telemetra"]["environment"]
    fields = known_names()
    for name in names:
        field = fields[name]
        parsed = getattr(Settings(_env_file=None, **{field: unset[name]}), field)  # type: ignore[call-arg]
        assert parsed == Settings.model_fields[field].get_default(call_default_factory=True), name


def test_postgres_volume_and_backups(prod: dict[str, Any]) -> None:
    postgres, backup = prod["services"]["postgres"], prod["services"]["backup"]
    assert any(
        (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/var/lib/postgresql/data"
        for v in postgres["volumes"]
    )
    assert "pg-data" in prod["volumes"]
    assert "telemetra-backup /backups" in " ".join(backup["entrypoint"])
    assert "telemetra-backup" in (DEPLOY.parent / "Dockerfile").read_text()


def test_grafana_provisioned_with_postgres_and_a_dashboard(prod: dict[str, Any]) -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "telemetra.yaml").read_text())["datasources"]
    assert source["type"] == "grafana-postgresql-datasource" and source["url"] == "postgres:5432"
    assert source["secureJsonData"]["password"].startswith("$__file{/run/secrets/")
    dashboards = list((DEPLOY / "grafana" / "dashboards").glob("*.json"))
    assert len(dashboards) == 1
    dashboard = json.loads(dashboards[0].read_text())
    assert dashboard["panels"] and all(p["datasource"]["uid"] == source["uid"] for p in dashboard["panels"])


def test_every_mounted_file_is_in_the_repository(prod: dict[str, Any]) -> None:
    for name, service in prod["services"].items():
        for source in bind_sources(service):
            relative = Path(source).relative_to(DEPLOY) if Path(source).is_relative_to(DEPLOY) else None
            if relative is None or str(relative).startswith(GENERATED):
                continue
            assert (DEPLOY / relative).exists(), f"{name} mounts {relative}, which is not in deploy/"


def test_dev_compose() -> None:
    dev = compose_config("compose.dev.yaml")
    (telemetra,) = dev["services"].values()
    assert telemetra["healthcheck"]["start_period"]
    assert target_ports(telemetra) == {8000, 1883}


MOSQUITTO_UID = 1883  # the eclipse-mosquitto image's user and group
TELEMETRA_UID = 10001  # the Dockerfile's telemetra user


def _run_make_secrets(deploy: Path, calls: Path) -> None:
    """deploy/make-secrets.sh in a copy of deploy/, with a `docker` on PATH that only records its
    arguments (no engine here): the dynamic-security state already exists, so only ownership changes a
    non-root user cannot make go through it."""
    bin_dir = deploy / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "docker"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\n')
    stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PUBLIC_HOSTNAME": "telemetry.test", "HOME": str(deploy)}
    python = shutil.which("python3")
    assert python is not None
    env["PATH"] += f":{Path(python).parent}"
    done = subprocess.run(
        ["sh", str(deploy / "make-secrets.sh")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr + done.stdout


def _can_read(path: Path, uid: int, gid: int) -> bool:
    return subprocess.run(["cat", str(path)], user=uid, group=gid, extra_groups=[], capture_output=True).returncode == 0


def test_make_secrets_modes_let_each_container_read_its_files_and_nobody_else(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        missing_service("openssl not installed")
    # A directory other users can traverse (pytest's tmp_path is 0700), so the uid checks below are real.
    root = Path(tempfile.mkdtemp(prefix="telemetra-deploy-"))
    try:
        root.chmod(0o755)
        deploy = root / "deploy"
        deploy.mkdir()
        shutil.copy(DEPLOY / "make-secrets.sh", deploy)
        (deploy / "mosquitto" / "data").mkdir(parents=True)
        (deploy / "mosquitto" / "data" / "dynamic-security.json").write_text("{}")
        calls = tmp_path / "docker-calls"
        _run_make_secrets(deploy, calls)
        secrets, certs = deploy / "secrets", deploy / "certs"
        admin_key = (secrets / "admin_key").read_text()

        def mode(path: Path) -> int:
            return stat.S_IMODE(path.stat().st_mode)

        assert mode(secrets) == 0o700  # this host's other users cannot reach the secrets
        assert {p.name: mode(p) for p in secrets.iterdir()} == dict.fromkeys(
            (
                "postgres_password",
                "admin_key",
                "mqtt_dynsec_password",
                "mqtt_service_password",
                "grafana_db_password",
                "grafana_admin_password",
                "database_url",
                "mqtt_url",
            ),
            0o644,
        )  # bind-mounted into each container, read there by its own user
        assert mode(certs) == 0o755
        assert mode(certs / "server.crt") == mode(certs / "ca.crt") == 0o644
        assert mode(certs / "server.key") == 0o640 and mode(deploy / "backups") == 0o700
        ssl.create_default_context().load_cert_chain(certs / "server.crt", certs / "server.key")  # a usable pair

        if os.getuid() == 0:
            assert (certs / "server.key").stat().st_gid == MOSQUITTO_UID
            assert (deploy / "backups").stat().st_uid == TELEMETRA_UID
            # Mosquitto 2.0 loads the key after dropping to its user: that user can read it, another cannot.
            assert _can_read(certs / "server.key", MOSQUITTO_UID, MOSQUITTO_UID)
            assert _can_read(certs / "server.crt", 12345, 12345)
            assert not _can_read(certs / "server.key", 12345, 12345)
            assert not _can_read(secrets / "admin_key", 12345, 12345)
            assert not calls.exists()  # root needs no container for it
        else:
            recorded = calls.read_text()
            assert f"chgrp {MOSQUITTO_UID} server.key" in recorded and f"chown {TELEMETRA_UID} ." in recorded

        _run_make_secrets(deploy, calls)  # again (after replacing a certificate): secrets kept, modes the same
        assert (secrets / "admin_key").read_text() == admin_key
        assert mode(secrets) == 0o700 and mode(certs / "server.key") == 0o640
    finally:
        shutil.rmtree(root)


def _self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def _mqtt_over_wss(port: int, ca: Path, username: str, password: str) -> str:
    """CONNECT through wss://localhost:<port>/mqtt, verifying the proxy's certificate: the CONNACK's reason."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    answered, reason = threading.Event(), []
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, transport="websockets",
                         protocol=mqtt.MQTTv5, reconnect_on_failure=False)  # fmt: skip
    client.ws_set_options(path="/mqtt")
    client.tls_set(ca_certs=str(ca))
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, rc, _p: (reason.append(str(rc)), answered.set())
    client.connect("localhost", port, keepalive=30)
    client.loop_start()
    try:
        assert answered.wait(15), "no CONNACK through the proxy"
    finally:
        client.disconnect()
        client.loop_stop()
    return reason[0]


def test_nginx_serves_mqtt_over_wss_from_mosquittos_websocket_listener(tmp_path: Path) -> None:
    """deploy/nginx/nginx.conf in a real nginx (service names and ports pointed at this machine) in front of
    deploy/mosquitto/mosquitto.conf's WebSocket listener: an MQTT client over wss://<host>/mqtt gets the
    broker's CONNACK (accepted with the dynsec admin's password, refused with a wrong one)."""
    from tests.support.mosquitto import deploy_mosquitto, free_port

    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None or shutil.which("openssl") is None:
        missing_service("nginx or openssl not installed (apt-get install nginx-light openssl)")
        return
    cert, key = _self_signed(tmp_path)
    with deploy_mosquitto(admin_password="wss-admin-password") as broker:  # pragma: allowlist secret
        http_port, https_port = free_port(), free_port()
        conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
        for shipped, here in (
            ("/etc/nginx/certs/server.crt", str(cert)),
            ("/etc/nginx/certs/server.key", str(key)),
            ("http://mosquitto:9001", f"http://127.0.0.1:{broker.ws_port}"),
            ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
            ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ):
            assert shipped in conf, f"nginx.conf no longer has {shipped!r}"
            conf = conf.replace(shipped, here)
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False).stderr
        if tuple(int(n) for n in re.findall(r"\d+", version)[:2]) < (1, 25):
            conf = conf.replace("http2 on;", "")  # the image's nginx 1.27 has it; Debian 12's 1.22 does not
        (tmp_path / "logs").mkdir()
        (tmp_path / "nginx.conf").write_text(conf)
        args = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "logs/error.log")]
        globals_ = f"daemon off; pid {tmp_path}/nginx.pid;"
        checked = subprocess.run([*args, "-t", "-g", globals_], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, checked.stderr
        process = subprocess.Popen([*args, "-g", globals_], stderr=subprocess.PIPE, text=True)
        try:
            # Both listening (Mosquitto opens its WebSocket listener a moment after the MQTT one).
            deadline = time.monotonic() + 15
            for port in (broker.ws_port, https_port):
                while True:
                    assert process.poll() is None and time.monotonic() < deadline, (port, process.stderr)
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        time.sleep(0.05)
            assert _mqtt_over_wss(https_port, cert, "admin", "wss-admin-password") == "Success"
            assert _mqtt_over_wss(https_port, cert, "admin", "wrong") != "Success"  # the broker decides
        finally:
            process.terminate()
            process.wait(timeout=10)
