"""TLS by configuration: ``telemetra serve`` with TELEMETRA_TLS_CERT/KEY answers HTTPS (with HSTS) and its
embedded broker adds MQTT over TLS; both verified against a CA the test makes (cryptography), and a
client that does not trust that CA is refused. Nothing but real sockets."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion

from telemetra import startup
from tests.conftest import ADMIN, ADMIN_KEY
from tests.mqtt.conftest import telemetra_binary
from tests.support.mosquitto import free_port


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(directory: Path) -> Pki:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("telemetra test CA"))
        .issuer_name(_name("telemetra test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return pki


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEMETRA_") and k != "DATABASE_URL"}
    env |= {"TELEMETRA_DATA_DIR": str(tmp_path / "data"), "TELEMETRA_HOST": "127.0.0.1"}
    env |= {"TELEMETRA_ADMIN_KEYS": ADMIN_KEY, "TELEMETRA_MQTT_HOST": "127.0.0.1", **extra}
    return env


@dataclass
class TlsServer:
    port: int
    mqtt_tls_port: int
    pki: Pki
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    pki = make_pki(tmp_path)
    port, mqtt_port, tls_port = free_port(), free_port(), free_port()
    env = env_for(
        tmp_path,
        TELEMETRA_PORT=str(port),
        TELEMETRA_MQTT_PORT=str(mqtt_port),
        TELEMETRA_MQTT_TLS_PORT=str(tls_port),
        TELEMETRA_TLS_CERT=str(pki.cert),
        TELEMETRA_TLS_KEY=str(pki.key),
    )
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([*telemetra_binary(), "serve"], cwd=tmp_path, env=env, stdout=out, stderr=out)
    server = TlsServer(port, tls_port, pki, env)
    try:
        deadline = time.monotonic() + 30
        context = ssl.create_default_context(cafile=str(pki.ca))
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{server.url}/health", verify=context, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_https_with_hsts_and_mqtts_on_the_embedded_broker(tls_server: TlsServer) -> None:
    trusted = ssl.create_default_context(cafile=str(tls_server.pki.ca))
    with httpx.Client(base_url=tls_server.url, verify=trusted, headers=ADMIN, timeout=5) as client:
        health = client.get("/health")
        assert health.headers["strict-transport-security"] == "max-age=31536000"
        assert health.headers["x-content-type-options"] == "nosniff"
        assert health.json()["checks"]["mqtt"]["tls_broker"] == f"127.0.0.1:{tls_server.mqtt_tls_port}"
        r = client.post("/api/v1/devices", json={"id": "tls-1"})
        assert r.status_code == 201, r.text
        secret = r.json()["credentials"]["api_key"]

        # A client without the CA is refused: the certificate is the test CA's, not a public one.
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{tls_server.url}/health", timeout=5)
        # Plain HTTP on the HTTPS port gets no answer.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{tls_server.port}/health", timeout=5)

        # MQTT over TLS, verified against the same CA; the message is stored.
        acked = threading.Event()
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-1", protocol=mqtt.MQTTv311)
        device.username_pw_set("tls-1", secret)
        device.tls_set_context(trusted)
        device.on_publish = lambda *_args: acked.set()
        device.connect("127.0.0.1", tls_server.mqtt_tls_port)
        device.loop_start()
        try:
            payload = json.dumps({"ts": "2026-11-23T10:00:00Z", "temperature": 21.5})
            device.publish("telemetra/tls-1/telemetry", payload, qos=1)
            assert acked.wait(10), "no PUBACK over TLS"
        finally:
            device.loop_stop()
            device.disconnect()
        latest = client.get("/api/v1/devices/tls-1/latest").json()
        assert json.dumps(latest).count("21.5") == 1

    # An MQTT client that does not trust the CA cannot connect.
    untrusting = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="tls-1", protocol=mqtt.MQTTv311)
    untrusting.tls_set_context(ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.connect("127.0.0.1", tls_server.mqtt_tls_port)

    # `telemetra simulate` with the server's own settings goes to the TLS listener (HTTPS to provision,
    # MQTTS to send), trusting the CA it is given.
    simulate = [*telemetra_binary(), "simulate", "--devices", "1", "--rate", "10", "--duration", "1"]
    simulated = subprocess.run(
        [*simulate, "--cafile", str(tls_server.pki.ca), "--json"],
        cwd=tls_server.env["TELEMETRA_DATA_DIR"],
        env=tls_server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert simulated.returncode == 0, simulated.stderr
    summary = json.loads(simulated.stdout)
    assert summary["messages"] > 0 and summary["errors"] == 0, summary
    # Without the CA it cannot provision over HTTPS: one message, no traceback.
    refused = subprocess.run(
        simulate,
        cwd=tls_server.env["TELEMETRA_DATA_DIR"],
        env=tls_server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr


def test_a_key_that_does_not_match_its_certificate_is_one_message(tmp_path: Path) -> None:
    first, second = make_pki(tmp_path / "a"), make_pki(tmp_path / "b")
    result = subprocess.run(
        [*telemetra_binary(), "serve"],
        cwd=tmp_path,
        env=env_for(
            tmp_path,
            TELEMETRA_PORT=str(free_port()),
            TELEMETRA_MQTT_PORT="0",
            TELEMETRA_TLS_CERT=str(first.cert),
            TELEMETRA_TLS_KEY=str(second.key),
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == startup.EXIT_TLS
    assert "Traceback" not in result.stderr
    assert f"TLS: cannot use TELEMETRA_TLS_CERT={first.cert} with TELEMETRA_TLS_KEY={second.key}" in result.stderr
    only_cert = subprocess.run(
        [*telemetra_binary(), "serve"],
        cwd=tmp_path,
        env=env_for(tmp_path, TELEMETRA_PORT=str(free_port()), TELEMETRA_TLS_CERT=str(first.cert)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert only_cert.returncode == startup.EXIT_TLS and "set TELEMETRA_TLS_KEY as well" in only_cert.stderr


def test_deploy_mosquitto_config_serves_mqtts(tmp_path: Path) -> None:
    """deploy/mosquitto/mosquitto.conf with conf.d/tls.conf, as compose.prod.yaml mounts them: a device
    connects over TLS on the 8883 listener (a free port here), verified against the test's CA."""
    from tests.mqtt.test_dynsec import make_provisioner
    from tests.support.mosquitto import deploy_mosquitto

    pki = make_pki(tmp_path)
    with deploy_mosquitto(tls=(pki.ca, pki.cert, pki.key)) as broker:
        assert broker.tls_port is not None

        async def provision() -> None:
            async with make_provisioner(broker.instance) as provisioner:
                await provisioner.upsert_device("dev-tls", "pw-tls-0123456789")

        import asyncio

        asyncio.run(provision())
        connected = threading.Event()
        device = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-tls", protocol=mqtt.MQTTv311)
        device.username_pw_set("dev-tls", "pw-tls-0123456789")  # pragma: allowlist secret
        device.tls_set_context(ssl.create_default_context(cafile=str(pki.ca)))
        device.on_connect = lambda _c, _u, _f, reason, _p: reason.is_failure or connected.set()
        device.connect("127.0.0.1", broker.tls_port)
        device.loop_start()
        try:
            assert connected.wait(10), broker.instance.log()
        finally:
            device.loop_stop()
            device.disconnect()
