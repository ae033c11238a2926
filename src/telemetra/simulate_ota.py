"""What a simulated MQTT device does with an ``ota`` command (``telemetra simulate``).

It downloads the image in byte ranges (resuming where it stopped when a request fails, as a device on a
flaky link does), checks SHA-256 (and the MD5), reports ``{"update_id","status","progress","error"}`` on
``event/ota`` as it goes, "installs", and then reports the new ``fwVersion`` in its retained state —
which is what completes it on the server. A planted share of devices fails instead (``--ota-failure-rate``),
chosen by a hash of device id and version, so a test run is reproducible.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 * 1024
RETRY_FOR_S = 60.0  # keep resuming a download this long (a server restart takes a few seconds)
INSTALL_S = 0.2


def planted_failure(device_id: str, version: str, rate: float) -> bool:
    """Whether this device fails this version: a stable draw, independent of the server's wave hash."""
    if rate <= 0:
        return False
    digest = hashlib.sha256(f"simulated-ota-failure:{device_id}:{version}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 10_000 < rate * 10_000


class OtaDevice(Protocol):
    """What the agent needs from a simulated device (``simulate.MqttDevice``)."""

    fw_version: str

    @property
    def device_id(self) -> str: ...

    def event(self, name: str, doc: dict[str, Any]) -> None: ...

    def report_state(self) -> None: ...


@dataclass
class OtaCounts:
    completed: int = 0
    failed: int = 0


class OtaAgent:
    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        failure_rate: float = 0.0,
        failure_versions: tuple[str, ...] = (),
        chunk_bytes: int = CHUNK_BYTES,
        install_s: float = INSTALL_S,
    ) -> None:
        self._http = http
        self._failure_rate = failure_rate
        self._failure_versions = set(failure_versions)
        self._chunk = chunk_bytes
        self._install_s = install_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.counts = OtaCounts()

    def handle(self, device: OtaDevice, params: dict[str, Any]) -> None:
        """Start updating ``device`` (a newer command replaces an update still running)."""
        running = self._tasks.pop(device.device_id, None)
        if running is not None:
            running.cancel()
        task = asyncio.get_running_loop().create_task(self._update(device, params), name=f"ota-{device.device_id}")
        self._tasks[device.device_id] = task
        task.add_done_callback(lambda done: self._forget(device.device_id, done))

    def _forget(self, device_id: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(device_id) is task:
            del self._tasks[device_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("simulated OTA of %s failed", device_id, exc_info=task.exception())

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _fails(self, device_id: str, version: str) -> bool:
        applies = not self._failure_versions or version in self._failure_versions
        return applies and planted_failure(device_id, version, self._failure_rate)

    async def _update(self, device: OtaDevice, params: dict[str, Any]) -> None:
        update_id = params.get("update_id")
        version = str(params.get("version") or "")

        def report(status: str, progress: int | None = None, error: str | None = None) -> None:
            doc: dict[str, Any] = {"update_id": update_id, "status": status}
            if progress is not None:
                doc["progress"] = progress
            if error is not None:
                doc["error"] = error
            device.event("ota", doc)

        try:
            url, size = str(params["url"]), int(params["size"])
            sha256, md5 = str(params["sha256"]), params.get("md5")
        except (KeyError, TypeError, ValueError):
            report("failed", error="ota command without url/size/sha256")
            self.counts.failed += 1
            return
        report("downloading", 0)
        try:
            got_sha, got_md5 = await self._download(url, size, lambda p: report("downloading", p))
        except (httpx.HTTPError, DownloadError) as exc:
            report("failed", error=f"download failed: {exc}")
            self.counts.failed += 1
            return
        if got_sha != sha256 or (md5 and got_md5 != md5):
            report("failed", error="checksum mismatch")
            self.counts.failed += 1
            return
        report("installing", 100)
        await asyncio.sleep(self._install_s)
        if self._fails(device.device_id, version):
            report("failed", error="simulated install failure")
            self.counts.failed += 1
            return
        device.fw_version = version
        device.report_state()  # the new fwVersion is what completes the device on the server
        self.counts.completed += 1

    async def _download(self, url: str, size: int, progress: Any) -> tuple[str, str]:
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        offset, next_report = 0, 50
        loop = asyncio.get_running_loop()
        give_up = loop.time() + RETRY_FOR_S
        delay = 0.2
        while offset < size:
            end = min(offset + self._chunk, size) - 1
            try:
                resp = await self._http.get(url, headers={"Range": f"bytes={offset}-{end}"})
            except httpx.TransportError:
                resp = None
            if resp is None or resp.status_code >= 500:
                if loop.time() > give_up:
                    raise DownloadError(f"server unreachable for {RETRY_FOR_S:.0f} s at byte {offset}")
                await asyncio.sleep(delay)  # resume from `offset` once the server answers again
                delay = min(delay * 2, 2.0)
                continue
            if resp.status_code != 206 or len(resp.content) != end - offset + 1:
                raise DownloadError(f"HTTP {resp.status_code} for bytes {offset}-{end}")
            sha.update(resp.content)
            md5.update(resp.content)
            offset = end + 1
            delay = 0.2
            percent = offset * 100 // size
            if percent >= next_report and offset < size:
                progress(percent)
                next_report = percent + 50
        return sha.hexdigest(), md5.hexdigest()


class DownloadError(RuntimeError):
    pass
