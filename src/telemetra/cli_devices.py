"""``telemetra devices …`` and ``telemetra claim-codes``: the device registry through the running server's
HTTP API, so every change takes effect at once (the server's caches, its MQTT sessions and Mosquitto's
accounts follow), never behind its back in whatever database the current directory implies.

The server is found from the same settings it runs with (``TELEMETRA_HOST``/``TELEMETRA_PORT``, the
admin key from ``TELEMETRA_ADMIN_KEYS`` or the data directory), or ``--url``/``--key``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from telemetra.cli_ota import answer, api, json_option, key_option, url_option

console = Console()


def _device_id(value: str) -> str:
    from telemetra.domain.ids import reserved_reason
    from telemetra.ingest.normalize import valid_device_id

    if not valid_device_id(value):
        raise click.BadParameter("letters, digits, '-', '_', '.', ':' (1-128)", param_hint="DEVICE_ID")
    reserved = reserved_reason(value)
    if reserved:
        raise click.BadParameter(reserved, param_hint="DEVICE_ID")
    return value


def _print_credentials(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        device_id, creds = doc["device"]["id"], doc["credentials"]
        click.echo(json.dumps({"device_id": device_id, "api_key": creds["api_key"], "mqtt": creds["mqtt"]}, indent=2))
    if sys.stderr.isatty():
        click.echo("The secret is shown once; only its hash is stored.", err=True)


@click.group()
def devices() -> None:
    """Create, list, show, re-key, disable, enable and delete devices (over the server's HTTP API)."""


@devices.command("create")
@click.argument("device_id", callback=lambda _ctx, _param, value: _device_id(value))
@click.option("--model", default=None, help="device model (firmware and rollouts are per model)")
@click.option("--name", default=None, help="display name")
@click.option("--kind", type=click.Choice(["device", "gateway"]), default="device", show_default=True,
              help="a gateway posts for the nodes behind it")  # fmt: skip
@url_option
@key_option
@click.option("--json", "as_json", is_flag=True, help="print the server's whole answer")
def devices_create(
    device_id: str, model: str | None, name: str | None, kind: str, url: str | None, key: str | None, as_json: bool
) -> None:
    """Register DEVICE_ID and print its credentials (shown once)."""
    body = {"id": device_id, "kind": kind} | {k: v for k, v in (("model", model), ("name", name)) if v is not None}
    with api(url, key) as client:
        _print_credentials(answer(client.post("/api/v1/devices", json=body)), as_json)


@devices.command("rotate")
@click.argument("device_id")
@url_option
@key_option
@click.option("--json", "as_json", is_flag=True, help="print the server's whole answer")
def devices_rotate(device_id: str, url: str | None, key: str | None, as_json: bool) -> None:
    """New credentials for DEVICE_ID; the old secret stops working at once."""
    with api(url, key) as client:
        _print_credentials(answer(client.post(f"/api/v1/devices/{device_id}/rotate")), as_json)


@devices.command("list")
@click.option("--model", default=None, help="only this model")
@click.option("--search", default=None, help="id or name contains this")
@click.option("--online/--offline", "online", default=None, help="only devices that are online / offline")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True, help="at most this many")
@url_option
@key_option
@json_option
def devices_list(
    model: str | None, search: str | None, online: bool | None, limit: int, url: str | None, key: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """List devices, with whether each is online (heard from within TELEMETRA_OFFLINE_AFTER_S)."""
    params: dict[str, Any] = {"limit": limit}
    params |= {k: v for k, v in (("model", model), ("search", search), ("online", online)) if v is not None}
    with api(url, key) as client:
        doc = answer(client.get("/api/v1/devices", params=params))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    table = Table("id", "kind", "model", "firmware", "online", "last seen", "", title=f"{doc['total']} devices")
    for d in doc["devices"]:
        table.add_row(
            d["id"], d["kind"], d["model"] or "", d["fw_version"] or "", "yes" if d["online"] else "no",
            d["last_seen_at"] or "never", "disabled" if d["disabled"] else "",
        )  # fmt: skip
    console.print(table)


@devices.command("show")
@click.argument("device_id")
@url_option
@key_option
@json_option
def devices_show(device_id: str, url: str | None, key: str | None, as_json: bool) -> None:
    """One device's registry entry."""
    with api(url, key) as client:
        doc = answer(client.get(f"/api/v1/devices/{device_id}"))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    table = Table("field", "value", show_header=False, title=device_id)
    for field, value in doc.items():
        table.add_row(field, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console.print(table)


def _set_disabled(device_id: str, disabled: bool, url: str | None, key: str | None, as_json: bool) -> None:
    with api(url, key) as client:
        doc = answer(client.patch(f"/api/v1/devices/{device_id}", json={"disabled": disabled}))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"{device_id} {'disabled' if disabled else 'enabled'}")


@devices.command("disable")
@click.argument("device_id")
@url_option
@key_option
@json_option
def devices_disable(device_id: str, url: str | None, key: str | None, as_json: bool) -> None:
    """Refuse DEVICE_ID's credentials from now on (its connections are closed); data is kept."""
    _set_disabled(device_id, True, url, key, as_json)


@devices.command("enable")
@click.argument("device_id")
@url_option
@key_option
@json_option
def devices_enable(device_id: str, url: str | None, key: str | None, as_json: bool) -> None:
    """Accept DEVICE_ID's credentials again."""
    _set_disabled(device_id, False, url, key, as_json)


@devices.command("delete")
@click.argument("device_id")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@url_option
@key_option
@json_option
def devices_delete(device_id: str, yes: bool, url: str | None, key: str | None, as_json: bool) -> None:
    """Delete DEVICE_ID with all its telemetry, state and events."""
    if not yes:
        click.confirm(f"Delete {device_id} and all its data?", abort=True)
    with api(url, key) as client:
        resp = client.delete(f"/api/v1/devices/{device_id}")
        if resp.status_code != 204:
            answer(resp)
    click.echo(json.dumps({"deleted": device_id}) if as_json else f"{device_id} deleted")


@devices.command("claim-codes")
@click.option("--count", type=click.IntRange(1, 1000), default=1, show_default=True, help="how many devices")
@click.option("--prefix", default="dev", show_default=True, help="device ids are <prefix>-<random>")
@click.option("--model", default=None, help="device model")
@click.option("--ttl", "ttl_s", type=click.IntRange(60, 365 * 86400), default=None,
              help="seconds until the codes expire (default TELEMETRA_CLAIM_CODE_TTL_S)")  # fmt: skip
@url_option
@key_option
@json_option
def devices_claim_codes(
    count: int, prefix: str, model: str | None, ttl_s: int | None, url: str | None, key: str | None, as_json: bool
) -> None:
    """Create COUNT devices without credentials, each with a one-time claim code (tab-separated lines)."""
    body: dict[str, Any] = {"count": count, "prefix": prefix}
    body |= {k: v for k, v in (("model", model), ("ttl_s", ttl_s)) if v is not None}
    with api(url, key) as client:
        doc = answer(client.post("/api/v1/claim-codes", json=body))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for code in doc["claim_codes"]:
        click.echo(f"{code['device_id']}\t{code['claim_code']}")
