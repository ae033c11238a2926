"""``telemetra firmware …`` and ``telemetra ota …``: talk to the running server over its HTTP API.

Base URL: ``--url``, else ``http://<TELEMETRA_HOST>:<TELEMETRA_PORT>`` (0.0.0.0 read as 127.0.0.1).
Admin key: ``--key``, else the first of TELEMETRA_ADMIN_KEYS, else ``<TELEMETRA_DATA_DIR>/admin.key``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, cast

import click
import httpx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

# A bar is worth drawing for images that take more than a moment to send.
PROGRESS_FROM_BYTES = 1024 * 1024


def server_url(explicit: str | None) -> str:
    if explicit:
        return explicit.rstrip("/")
    from telemetra.cli import load_settings
    from telemetra.endpoints import http_url

    return http_url(load_settings())


def admin_key(explicit: str | None) -> str:
    from telemetra.simulate import SimulationError, resolve_admin_key

    try:
        return resolve_admin_key(explicit)
    except SimulationError as exc:
        raise click.ClickException(str(exc).replace("--admin-key", "--key")) from None


@contextmanager
def api(url: str | None, key: str | None) -> Iterator[httpx.Client]:
    base = server_url(url)
    timeout = httpx.Timeout(30.0, write=None, read=300.0)  # a large upload is written for as long as it takes
    with httpx.Client(base_url=base, headers={"X-API-Key": admin_key(key)}, timeout=timeout) as client:
        try:
            yield client
        except httpx.ConnectError as exc:
            raise click.ClickException(
                f"cannot reach Telemetra at {base}: {exc} (is `telemetra serve` running?)"
            ) from None


def answer(resp: httpx.Response) -> Any:
    """The JSON answer, or a one-line error naming the field the server named."""
    if resp.is_success:
        return resp.json()
    try:
        body = resp.json()
    except ValueError:
        raise click.ClickException(f"HTTP {resp.status_code}: {resp.text[:300]}") from None
    field = f" [{body.get('field')}]" if isinstance(body, dict) and body.get("field") else ""
    detail = body.get("detail") if isinstance(body, dict) else body
    raise click.ClickException(f"HTTP {resp.status_code}{field}: {detail}")


class _Counting:
    """A file whose reads move a progress bar (httpx streams a multipart file by reading it in chunks)."""

    def __init__(self, handle: IO[bytes], advance: Callable[[int], None]) -> None:
        self._handle = handle
        self._advance = advance

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._advance(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


def _echo(doc: Any, as_json: bool) -> bool:
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    return as_json


url_option = click.option("--url", default=None, help="server base URL (default from TELEMETRA_HOST/PORT)")
key_option = click.option("--key", default=None, help="admin key (default TELEMETRA_ADMIN_KEYS or data dir)")
json_option = click.option("--json", "as_json", is_flag=True, help="print the JSON answer")


@click.group()
def firmware() -> None:
    """Upload and list firmware images (over the server's HTTP API)."""


@firmware.command("upload")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="device model the image is for")
@click.option("--version", "version", required=True, help="semantic version (v1.2.3 and 1.2 normalise)")
@click.option("--hardware", default=None, help="hardware variant (default ESP32)")
@click.option("--notes", default=None, help="release notes")
@click.option("--stable", is_flag=True, help="star it as stable")
@url_option
@key_option
@json_option
def firmware_upload(
    file: Path,
    model: str,
    version: str,
    hardware: str | None,
    notes: str | None,
    stable: bool,
    url: str | None,
    key: str | None,
    as_json: bool,
) -> None:
    """Upload FILE; prints its id, size and SHA-256."""
    fields = {"model": model, "version": version, "is_stable": "true" if stable else "false"}
    if hardware:
        fields["hardware"] = hardware
    if notes:
        fields["release_notes"] = notes
    size = file.stat().st_size
    progress = Progress(
        "[bold]uploading",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        disable=size < PROGRESS_FROM_BYTES or not err_console.is_terminal,
        transient=True,
    )
    with api(url, key) as client, progress, file.open("rb") as handle:
        task = progress.add_task("upload", total=size)
        counting = _Counting(handle, lambda n: progress.advance(task, n))
        resp = client.post(
            "/api/v1/firmware/upload", data=fields, files={"file": (file.name, cast(IO[bytes], counting))}
        )
        doc = answer(resp)
    if not _echo(doc, as_json):
        click.echo(f"firmware {doc['id']}: {doc['model']} {doc['version']} ({doc['size_bytes']:,} bytes)")
        click.echo(f"sha256 {doc['sha256']}")
        if doc.get("signature"):
            click.echo(f"signature {doc['signature']}")


@firmware.command("list")
@click.option("--model", default=None, help="only this model")
@url_option
@key_option
@json_option
def firmware_list(model: str | None, url: str | None, key: str | None, as_json: bool) -> None:
    """List firmware, newest first."""
    with api(url, key) as client:
        doc = answer(client.get("/api/v1/firmware", params={"model": model} if model else None))
    if _echo(doc, as_json):
        return
    table = Table("id", "model", "version", "hardware", "size", "stable", "created", title=f"{doc['total']} firmware")
    for f in doc["items"]:
        table.add_row(
            str(f["id"]), f["model"], f["version"], f["hardware"], f"{f['size_bytes']:,}",
            "★" if f["is_stable"] else "", f["created_at"],
        )  # fmt: skip
    console.print(table)


@click.group()
def ota() -> None:
    """Start, watch, pause, resume and cancel rollouts (over the server's HTTP API)."""


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter("comma-separated integers, e.g. 5,25,100", param_hint=option) from None


@ota.command("start")
@click.option("--firmware", "firmware_id", type=int, required=True, help="firmware id")
@click.option("--model", default=None, help="target this model (default: the firmware's)")
@click.option("--devices", default=None, help="comma-separated device ids")
@click.option("--percentage", type=click.IntRange(1, 100), default=None, help="stable share of the fleet")
@click.option("--waves", default=None, help="cumulative percentages, e.g. 5,25,100")
@click.option("--rate", type=click.IntRange(min=1), default=None, help="devices notified per minute")
@click.option("--timeout", "timeout_s", type=click.IntRange(min=1), default=None, help="seconds per device")
@click.option("--retries", type=click.IntRange(0, 10), default=None, help="retries per failed device")
@click.option(
    "--pause-failure-percent",
    type=click.FloatRange(0, 100, min_open=True),
    default=None,
    help="pause the rollout when this share of finished devices failed",
)
@click.option(
    "--pause-min-finished", type=click.IntRange(min=1), default=None, help="…once at least this many finished"
)
@click.option("--force", is_flag=True, help="also devices that already run this version")
@url_option
@key_option
@json_option
def ota_start(
    firmware_id: int,
    model: str | None,
    devices: str | None,
    percentage: int | None,
    waves: str | None,
    rate: int | None,
    timeout_s: int | None,
    retries: int | None,
    pause_failure_percent: float | None,
    pause_min_finished: int | None,
    force: bool,
    url: str | None,
    key: str | None,
    as_json: bool,
) -> None:
    """Start a rollout of a firmware to devices (by model, list or percentage, in waves)."""
    body: dict[str, Any] = {"firmware_id": firmware_id, "force_update": force}
    optional = {
        "target_model": model,
        "target_device_ids": [d.strip() for d in devices.split(",") if d.strip()] if devices else None,
        "target_percentage": percentage,
        "waves": _ints(waves, "--waves"),
        "rate_per_minute": rate,
        "device_timeout_s": timeout_s,
        "max_retries": retries,
        "pause_failure_percent": pause_failure_percent,
        "pause_min_finished": pause_min_finished,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    if not any(k in body for k in ("target_model", "target_device_ids", "target_percentage", "waves")):
        body["waves"] = [100]  # a rollout to every device of the firmware's model, not a gateway job
    with api(url, key) as client:
        doc = answer(client.post("/api/v1/ota/updates", json=body))
    if not _echo(doc, as_json):
        _print_job(doc)


@ota.command("status")
@click.argument("update_id", type=int, required=False)
@url_option
@key_option
@json_option
def ota_status(update_id: int | None, url: str | None, key: str | None, as_json: bool) -> None:
    """One update with its waves, or (without UPDATE_ID) the list of updates."""
    with api(url, key) as client:
        if update_id is None:
            jobs = answer(client.get("/api/v1/ota/updates"))
            if _echo(jobs, as_json):
                return
            table = Table("id", "status", "delivery", "firmware", "devices", "done", "failed", title="updates")
            for j in jobs:
                p = j["progress"]
                table.add_row(
                    str(j["id"]), j["status"], j["delivery"], f"{j['node_type']} {j['version']}",
                    str(p["total"]), str(p["completed"]), str(p["failed"] + p["timed_out"]),
                )  # fmt: skip
            console.print(table)
            return
        doc = answer(client.get(f"/api/v1/ota/updates/{update_id}", params={"nodes_limit": 0}))
    if not _echo(doc, as_json):
        _print_job(doc)


def _transition(action: str) -> Callable[..., None]:
    @url_option
    @key_option
    @json_option
    @click.argument("update_id", type=int)
    def command(update_id: int, url: str | None, key: str | None, as_json: bool) -> None:
        with api(url, key) as client:
            doc = answer(client.post(f"/api/v1/ota/updates/{update_id}/{action}"))
        if not _echo(doc, as_json):
            _print_job(doc)

    command.__doc__ = f"{action.capitalize()} a rollout."
    return command


for _action in ("pause", "resume", "cancel"):
    ota.command(_action)(_transition(_action))


def _print_job(doc: dict[str, Any]) -> None:
    p = doc["progress"]
    title = f"update {doc['id']}: {doc['status']} — {doc['node_type']} {doc['version']} ({doc['delivery']})"
    console.print(f"[bold]{title}")
    if doc["status"] == "paused" and doc.get("paused_reason"):
        console.print(f"paused: {doc['paused_reason']}")
    console.print(
        f"devices {p['total']}: {p['completed']} completed, {p['failed']} failed, {p['timed_out']} timed out, "
        f"{p['notified'] + p['downloading'] + p['installing']} in progress, {p['pending']} pending"
    )
    if doc.get("waves"):
        table = Table("wave", "percent", "devices", "completed", "failed", "status")
        for i, w in enumerate(doc["waves"], 1):
            table.add_row(
                str(i), f"{w['percent']} %", str(w["devices"]), str(w["completed"]), str(w["failed"]), w["status"]
            )
        console.print(table)
