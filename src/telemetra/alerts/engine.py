"""The rules engine, as one capability: threshold rules evaluated on committed telemetry, offline
detection, and the alerts they raise and clear.

- **Threshold rules** follow the event hub's telemetry events — what was committed, from any process —
  through a bounded subscription: a rules engine that falls behind loses its oldest events (counted in
  ``telemetra_rule_events_missed``), ingest never waits for it. It subscribes only while there is a
  threshold rule, so without rules the writer is not asked to build telemetry events for it. Where a rule
  stands per device (``domain.rules``) is kept in the database and every transition is conditional
  (``storage.rules``), so with several processes evaluating the same reading one of them raises the alert.
- **Presence**: a sweep every ``sweep_s`` marks devices silent for longer than their interval
  (``domain.rules.offline_after_s``) offline, raises their ``offline`` alert and clears it for devices
  that came back; a device that says it is offline (Last Will, a state message) gets its alert at once,
  and one that comes back (a ``state`` event with ``online``) has it cleared at once. The sweep also fires
  the pending threshold breaches whose hold passed with no reading since, and reloads the rules (changes
  made through another process's API arrive within one sweep; this process's own apply at once).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.aio import every
from telemetra.alerts.rules_file import load_rules_file
from telemetra.domain import rules as R
from telemetra.domain.timeutil import now_ms
from telemetra.events import model
from telemetra.events.hub import EventHub
from telemetra.events.model import ChangeEvent, Gap
from telemetra.metrics import Metrics
from telemetra.storage.faults import DatabaseState, report_failure
from telemetra.storage.rules import RuleRepository, rule_of
from telemetra.storage.schema import Device
from telemetra.supervise import Failures, Supervisor

log = logging.getLogger(__name__)

Emit = Callable[[Sequence[ChangeEvent]], Awaitable[None]]
SUBSCRIPTION_QUEUE = 10_000


class RulesEngine:
    name = "rules"

    def __init__(
        self,
        repo: RuleRepository,
        engine: AsyncEngine,
        *,
        hub: EventHub,
        emit: Emit,
        metrics: Metrics,
        failures: Failures,
        offline_after_s: int,
        sweep_s: float = 10.0,
        offline_alerts: bool = True,
        offline_severity: str = "warning",
        rules_file: Path | None = None,
        database: DatabaseState | None = None,
    ) -> None:
        self._database = database  # where an outage is noted, once, instead of a traceback per round
        self.repo = repo
        self._engine = engine
        self._hub = hub
        self._emit = emit
        self._metrics = metrics
        self._supervisor = Supervisor("rules", failures)
        self._offline_after_s = offline_after_s
        self._sweep_s = sweep_s
        self._offline_alerts = offline_alerts
        self._offline_severity = offline_severity
        self._rules_file = rules_file
        self._rules: dict[int, R.Rule] = {}
        self._by_key: dict[str, list[R.Rule]] = {}
        self._offline_rules: list[R.Rule] = []
        self._standings: dict[tuple[int, str], R.Standing] = {}
        self._previous: dict[tuple[int, str], tuple[int, float]] = {}  # last reading (ts, value) per rule and device
        self._devices: dict[str, tuple[str | None, str | None]] = {}  # id → (model, kind), for the filters
        self._has_thresholds = asyncio.Event()
        self.sweeps = 0

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> RulesEngine:
        if self._rules_file is not None:
            count = await self.repo.sync_file(load_rules_file(self._rules_file), now_ms=now_ms())
            log.info("loaded %d rules from %s", count, self._rules_file)
        await self.reload()
        await self._supervisor.__aenter__()
        self._supervisor.spawn("thresholds", self._follow_telemetry)
        self._supervisor.spawn("presence-events", self._follow_presence)
        self._supervisor.spawn("sweep", self._sweep_forever)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._supervisor.__aexit__(exc_type, exc, tb)

    def health(self) -> dict[str, Any]:
        alive = all(self._supervisor.alive(n) for n in ("thresholds", "presence-events", "sweep"))
        return {
            "status": "ok" if alive else "down",
            "rules": len(self._rules),
            "standings": len(self._standings),
            "sweeps": self.sweeps,
        }

    async def reload(self) -> None:
        """Rules and standings as the database has them now."""
        rules = [rule_of(r) for r in await self.repo.list()]
        self._rules = {r.id: r for r in rules}
        by_key: dict[str, list[R.Rule]] = {}
        for rule in rules:
            if rule.enabled and rule.kind in (*R.VALUED, R.NODATA) and rule.key is not None:
                by_key.setdefault(rule.key, []).append(rule)
        self._by_key = by_key
        self._offline_rules = [r for r in rules if r.kind == R.OFFLINE and r.enabled]
        self._standings = await self.repo.standings()
        if by_key:
            self._has_thresholds.set()
        else:
            self._has_thresholds.clear()

    # --- thresholds -----------------------------------------------------------------------------------

    async def _follow_telemetry(self) -> None:
        while True:
            await self._has_thresholds.wait()
            async with self._hub.subscribe(types=(model.TELEMETRY,), maxsize=SUBSCRIPTION_QUEUE) as events:
                async for event in events:
                    if isinstance(event, Gap):
                        self._metrics.rule_events_missed.inc(max(event.missed, 0))
                        continue
                    if not self._by_key:
                        break  # the last threshold rule went: stop asking for telemetry events
                    try:
                        await self._on_telemetry(event)
                    except Exception as exc:
                        # One reading that fails (the database blinked) must not end the engine.
                        report_failure(self._database, exc, "rules: evaluating a reading of %s failed", event.device_id)

    async def _on_telemetry(self, event: ChangeEvent) -> None:
        device_id = event.device_id
        if device_id is None:
            return
        for key, value in event.data.get("values", {}).items():
            rules = self._by_key.get(key)
            if not rules or isinstance(value, str) or value is None:
                continue
            for rule in rules:
                device_model, device_kind = await self._device(device_id) if rule.needs_device else (None, None)
                if not rule.applies_to(device_id, device_model, device_kind):
                    continue
                self._metrics.rule_evaluations.inc()
                await self.evaluate(rule, device_id, float(value), event.ts)

    async def evaluate(self, rule: R.Rule, device_id: str, value: float, ts: int) -> None:
        slot = (rule.id, device_id)
        previous = self._previous.get(slot)
        if previous is not None and ts < previous[0]:
            return  # a late reading: history, not the condition now
        self._previous[slot] = (ts, value)
        standing = self._standings.get(slot)
        if rule.kind == R.NODATA:
            if standing is not None and standing.status == R.FIRING:
                self._standings.pop(slot, None)
                await self.announce(await self.repo.clear(rule.id, device_id, now_ms=now_ms()), "cleared")
            return
        if rule.kind == R.RATE:
            rate = R.rate_per_s(previous, ts, value)
            if rate is None:
                return
            value = rate
        new, action = R.step(rule, standing, value, ts)
        now = now_ms()
        if action == "raise":
            assert new is not None
            alert = await self.repo.fire(rule, device_id, new, now_ms=now, message=_message(rule, value))
            if alert is not None:
                self._standings[slot] = new
                await self.announce([alert], "raised")
            else:  # another process made the transition: take what it wrote
                current = await self.repo.standing(rule.id, device_id)
                self._set(slot, current)
        elif action == "clear":
            self._standings.pop(slot, None)
            await self.announce(await self.repo.clear(rule.id, device_id, now_ms=now), "cleared")
        elif new is None and standing is not None:
            self._standings.pop(slot, None)
            await self.repo.forget_pending(rule.id, device_id)
        elif new is not None and (standing is None or standing.status != new.status):
            self._standings[slot] = new
            await self.repo.set_pending(rule.id, device_id, new, now_ms=now)

    def _set(self, slot: tuple[int, str], standing: R.Standing | None) -> None:
        if standing is None:
            self._standings.pop(slot, None)
        else:
            self._standings[slot] = standing

    async def _device(self, device_id: str) -> tuple[str | None, str | None]:
        """The device's model and kind (None, None: no such device)."""
        if device_id not in self._devices:
            async with self._engine.connect() as conn:
                found = (await conn.execute(select(Device.model, Device.kind).where(Device.id == device_id))).first()
                self._devices[device_id] = (found[0], found[1]) if found is not None else (None, None)
        return self._devices[device_id]

    # --- presence -------------------------------------------------------------------------------------

    async def _follow_presence(self) -> None:
        async with self._hub.subscribe(types=(model.STATE,), maxsize=SUBSCRIPTION_QUEUE) as events:
            async for event in events:
                if isinstance(event, Gap) or event.device_id is None or "online" not in event.data:
                    continue  # a missed one is caught up by the next sweep
                try:
                    if event.data["online"] is True:
                        cleared = await self.repo.clear_returned(now_ms=now_ms(), device_id=event.device_id)
                        await self.announce(cleared, "cleared")
                    elif event.data["online"] is False and self._offline_alerts:
                        await self._said_offline(event.device_id)
                except Exception as exc:
                    report_failure(self._database, exc, "rules: presence of %s failed", event.device_id)

    async def _said_offline(self, device_id: str) -> None:
        device_model, device_kind = await self._device(device_id)
        rule = R.offline_rule_for(device_id, device_model, self._offline_rules, device_kind)
        alert = await self.repo.raise_offline(
            device_id,
            rule=rule,
            severity=rule.severity if rule else self._offline_severity,
            now_ms=now_ms(),
            message=f"{device_id} went offline",
        )
        if alert is not None:
            await self.announce([alert], "raised")

    async def _sweep_forever(self) -> None:
        def failed(exc: Exception) -> None:
            report_failure(self._database, exc, "rules: presence sweep failed; trying again in %s s", self._sweep_s)

        await every(self._sweep_s, self.sweep, failed=failed)

    async def sweep(self) -> None:
        """One pass: rules reloaded, silent devices marked offline, returned ones cleared, held breaches fired."""
        await self.reload()
        self._devices.clear()
        now = now_ms()
        if self._offline_alerts or self._offline_rules:
            shortest = min([self._offline_after_s, *(r.for_s for r in self._offline_rules)])
            for device_id, device_model, device_kind, last_seen in await self.repo.silent_devices(
                before=now - shortest * 1000
            ):
                self._devices[device_id] = (device_model, device_kind)
                rule = R.offline_rule_for(device_id, device_model, self._offline_rules, device_kind)
                interval = rule.for_s if rule else self._offline_after_s
                cutoff = now - interval * 1000
                if last_seen > cutoff or (rule is None and not self._offline_alerts):
                    continue
                alert = await self.repo.mark_offline(
                    device_id,
                    cutoff=cutoff,
                    rule=rule,
                    severity=rule.severity if rule else self._offline_severity,
                    now_ms=now,
                    message=f"{device_id} not heard from for {interval} s",
                )
                if alert is not None:
                    await self._emit([ChangeEvent(model.STATE, device_id, now, {"online": False})])
                    await self.announce([alert], "raised")
        await self.announce(await self.repo.clear_returned(now_ms=now), "cleared")
        for rule in self._rules.values():
            if rule.kind == R.NODATA and rule.enabled and rule.key is not None:
                await self._sweep_nodata(rule, now)
        for rule_id, device_id, standing in await self.repo.pending():
            rule = self._rules.get(rule_id)
            if rule is not None and R.held_long_enough(rule, standing, now):
                message = _message(rule, standing.value)
                alert = await self.repo.fire(rule, device_id, standing, now_ms=now, message=message)
                if alert is not None:
                    self._standings[(rule_id, device_id)] = R.Standing(R.FIRING, standing.since, standing.value)
                    await self.announce([alert], "raised")
        self.sweeps += 1
        self._metrics.presence_sweeps.inc()

    async def _sweep_nodata(self, rule: R.Rule, now: int) -> None:
        assert rule.key is not None
        cutoff = now - rule.for_s * 1000
        for device_id, device_model, device_kind, last_ts in await self.repo.last_readings(rule.key):
            if not rule.applies_to(device_id, device_model, device_kind) or last_ts > cutoff:
                continue
            standing = R.Standing(R.FIRING, last_ts, None)
            message = f"{rule.name}: no {rule.key} for {rule.for_s} s"
            alert = await self.repo.fire(rule, device_id, standing, now_ms=now, message=message)
            if alert is not None:
                self._standings[(rule.id, device_id)] = standing
                await self.announce([alert], "raised")

    async def announce(self, alerts: list[dict[str, Any]], change: str) -> None:
        if not alerts:
            return
        for alert in alerts:
            self._metrics.alerts_changed.labels(alert["type"], change).inc()
        await self._emit(
            [ChangeEvent(model.ALERT, a["device_id"], a["updated_at"], {"alert": a, "change": change}) for a in alerts]
        )


def _message(rule: R.Rule, value: float | None) -> str:
    shown = "?" if value is None else f"{value:g}"
    if rule.kind == R.RATE:
        return f"{rule.name}: {rule.key} changing {shown}/s ({rule.op} {rule.value:g}/s)"
    return f"{rule.name}: {rule.key} = {shown} ({rule.op} {rule.value:g})"
