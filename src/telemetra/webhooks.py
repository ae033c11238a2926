"""Webhooks as one capability: committed events in, signed JSON POSTs out, with retries and a log.

- **Enqueue.** A subscriber of the event hub — bounded, like every subscriber, so ingest never waits for
  it — turns alert, presence, registry and rollout events into webhook events (``domain.webhooks``) and
  writes one delivery row per subscribed webhook, in batches. Each process sees every process's events
  (the event bridge), so each enqueues them all: the row's ``event_key``, a digest of the event itself,
  makes the second insert a no-op, and whichever process saw it first, the event is delivered once per
  webhook. It subscribes only while an enabled webhook exists. What it falls too far behind to see is
  counted (``telemetra_webhook_events_missed``) and logged — the events of the commit are not replayed
  from the database, so a crash in the instant between a commit and its enqueue loses that notification
  (the data is stored; see the README).
- **Deliver.** A loop claims due deliveries (``storage.webhooks``: a lease, ``SKIP LOCKED`` on
  PostgreSQL, so several processes share the work and never send one delivery twice at once), POSTs up
  to ``concurrency`` at a time, and records each outcome: a 2xx is delivered; anything else — an error
  status, a refused connection, a timeout — is tried again after an exponential, jittered delay (never
  before the receiver's ``Retry-After``), until ``max_attempts`` have failed. Deliveries survive restarts;
  one claimed by a process that died is tried again when its lease ends (receivers dedupe on the body's
  ``id``, the same for every attempt). Delivered and failed rows leave the log after ``log_days``.
- **SQLite.** Every write here (enqueue, claim, record) queues at the process's write gate
  (``storage.database.write_gate``; the ingest writer lets what waits there go before its next group
  commit) rather than polling SQLite's busy handler, and a round's outcomes are written with the next
  claim: one transaction per round. Each waits for at most the commit under way, so a delivery trails
  its event by a few group commits.

Headers of every POST: ``X-Telemetra-Event`` (the event name), ``X-Telemetra-Delivery`` (the delivery's
id), ``X-Telemetra-Timestamp`` (Unix seconds) and ``X-Telemetra-Signature`` (``domain.webhooks.signature``).
App layer: it wires the hub, storage and an HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx
import orjson

from telemetra import __version__
from telemetra.aio import wait_set
from telemetra.domain import webhooks as W
from telemetra.domain.timeutil import ms_to_iso, now_ms
from telemetra.events import model
from telemetra.events.hub import UNKNOWN, EventHub, Subscription
from telemetra.events.model import ChangeEvent, Gap
from telemetra.logs import Throttle
from telemetra.metrics import Metrics
from telemetra.storage.faults import DatabaseState, report_failure
from telemetra.storage.schema import WebhookRow
from telemetra.storage.webhooks import Claimed, Outcome, WebhookRepository
from telemetra.supervise import Failures, Supervisor

log = logging.getLogger(__name__)

SUBSCRIPTION_QUEUE = 10_000
ENQUEUE_BATCH = 1_000  # events taken from the subscription per insert
RELOAD_S = 5.0  # webhooks changed through another process are seen within this
POLL_S = 1.0  # deliveries enqueued by another process are seen within this
PRUNE_EVERY_S = 3600.0
RECORD_WITHIN_S = 0.5  # an outcome waits at most this for the rest of its round before it is written alone
ERROR_TEXT = 300  # characters of a receiver's answer (or of the error) kept in the log
_TYPES = (model.ALERT, model.STATE, model.DEVICE, model.OTA)
_KEY_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _iso_times(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        ("rule" if k == "rule_id" else k): (ms_to_iso(v) if k.endswith("_at") and isinstance(v, int) else v)
        for k, v in row.items()
    }


class EventNames:
    """Committed events as webhook events (name and data), or None for what webhooks do not carry. It
    remembers each device's last presence, so ``device.online`` is sent when presence changes, not for
    every state message that repeats it (after a restart, the first one is sent again)."""

    def __init__(self) -> None:
        self._online: dict[str, bool] = {}

    def of(self, event: ChangeEvent) -> tuple[str, dict[str, Any]] | None:
        data = event.data
        if event.type == model.ALERT:
            change = data.get("change")
            if change in W.ALERT_CHANGES and isinstance(data.get("alert"), Mapping):
                return f"alert.{change}", {"alert": _iso_times(data["alert"])}
        elif event.type == model.STATE:
            online = data.get("online")
            if isinstance(online, bool) and event.device_id is not None:
                if self._online.get(event.device_id) is online:
                    return None
                self._online[event.device_id] = online
                return ("device.online" if online else "device.offline"), {"online": online}
        elif event.type == model.DEVICE:
            change = data.get("change")
            if change in W.DEVICE_CHANGES:
                if change == "deleted" and event.device_id is not None:
                    self._online.pop(event.device_id, None)
                return f"device.{change}", {"change": change}
        elif event.type == model.OTA:
            status = data.get("status")
            prefix = "rollout" if event.device_id is None else "rollout.device"
            if isinstance(status, str) and f"{prefix}.{status}" in W.EVENT_NAMES:
                return f"{prefix}.{status}", dict(data)
        return None


def event_body(name: str, device_id: str | None, ts: int, data: Mapping[str, Any]) -> tuple[str, str]:
    """The event's key (the same from every process that saw it) and the JSON body every webhook gets."""
    key = hashlib.sha256(orjson.dumps([name, device_id, ts, data], option=_KEY_OPTIONS)).hexdigest()
    body = {"id": f"evt_{key[:24]}", "type": name, "created_at": ms_to_iso(ts), "device_id": device_id, "data": data}
    return key, orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS).decode()


class Webhooks:
    name = "webhooks"

    def __init__(
        self,
        repo: WebhookRepository,
        *,
        hub: EventHub,
        metrics: Metrics,
        failures: Failures,
        timeout_s: float,
        max_attempts: int,
        retry_base_s: float,
        retry_max_s: float,
        concurrency: int,
        log_days: float,
        database: DatabaseState | None = None,
    ) -> None:
        self.repo = repo
        self._hub = hub
        self._metrics = metrics
        self._database = database
        self._supervisor = Supervisor("webhooks", failures)
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._retry_base_s = retry_base_s
        self._retry_max_s = retry_max_s
        self._concurrency = concurrency
        self._log_days = log_days
        self._lease_ms = int((timeout_s + 30) * 1000)
        self._webhooks: dict[int, WebhookRow] = {}
        self._changed = asyncio.Event()  # the set of webhooks changed here
        self._events: Subscription | None = None  # the hub's events, while an enabled webhook exists
        self._due = asyncio.Event()  # deliveries were enqueued here
        self._names = EventNames()
        self._client: httpx.AsyncClient | None = None
        self._in_flight = 0
        self._unrecorded: list[Outcome] = []  # attempts made, their outcomes not yet written
        self._throttle = Throttle(60.0)
        self.enqueued = 0
        self.pending = 0  # deliveries waiting, as last counted (every RELOAD_S)

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Webhooks:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout_s),
            follow_redirects=False,
            headers={"User-Agent": f"Telemetra-Webhooks/{__version__}"},
            limits=httpx.Limits(max_connections=self._concurrency * 2),
            trust_env=False,
        )
        with contextlib.suppress(Exception):  # an outage at start: the loops retry
            await self.reload()
        await self._supervisor.__aenter__()
        self._supervisor.spawn("enqueue", self._enqueue_forever)
        self._supervisor.spawn("deliver", self._deliver_forever)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._supervisor.__aexit__(exc_type, exc, tb)
        finally:
            if self._client is not None:
                await self._client.aclose()

    def health(self) -> dict[str, Any]:
        alive = all(self._supervisor.alive(n) for n in ("enqueue", "deliver"))
        return {
            "status": "ok" if alive else "down",
            "webhooks": sum(1 for w in self._webhooks.values() if w.enabled),
            "pending": self.pending,
            "in_flight": self._in_flight,
        }

    async def reload(self) -> None:
        """The webhooks as the database has them now. The hub subscription follows at once (before an API
        answer that created the first webhook returns, so the next event is not missed)."""
        self._webhooks = {w.id: w for w in await self.repo.list()}
        wanted = bool(self._subscribed())
        if wanted and self._events is None:
            self._events = self._hub.subscribe(types=_TYPES, maxsize=SUBSCRIPTION_QUEUE)
        elif not wanted and self._events is not None:
            self._events.close()
            self._events = None
        self._changed.set()

    async def test(self, webhook_id: int) -> int:
        """A ``webhook.test`` delivery to this webhook, now (subscribed to it or not); its delivery id."""
        key, body = event_body(W.TEST, None, now_ms(), {"webhook_id": webhook_id, "nonce": time.monotonic_ns()})
        ids = await self.repo.enqueue(
            [{"webhook_id": webhook_id, "event_key": key, "event": W.TEST, "device_id": None, "body": body}],
            now_ms=now_ms(),
        )
        self._due.set()
        return ids[0]

    def wake(self) -> None:
        """Something is due now (a redelivery asked for through the API)."""
        self._due.set()

    # --- enqueue --------------------------------------------------------------------------------------

    def _subscribed(self) -> list[WebhookRow]:
        return [w for w in self._webhooks.values() if w.enabled]

    async def _enqueue_forever(self) -> None:
        try:
            while True:
                events = self._events
                if events is None:
                    await self._wait_for_webhooks()
                    continue
                batch = await self._take(events)
                if batch:
                    await self._enqueue(batch)
        finally:
            if self._events is not None:
                self._events.close()
                self._events = None

    async def _wait_for_webhooks(self) -> None:
        self._changed.clear()
        await wait_set(self._changed, RELOAD_S)
        await self._reload_quietly()

    async def _reload_quietly(self) -> None:
        began = DatabaseState.attempt()
        try:
            await self.reload()
        except Exception as exc:
            report_failure(self._database, exc, "webhooks: reading the webhooks failed")
        else:
            if self._database is not None:
                self._database.succeeded(began)

    async def _take(self, events: Subscription) -> list[ChangeEvent]:
        """The events waiting (at least one, or none after ``RELOAD_S``, when the webhooks are re-read)."""
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns an event that arrives as the
            # task is cancelled and drops the cancellation, and this loop then outlives its shutdown.
            async with asyncio.timeout(RELOAD_S):
                first = await events.next()
        except TimeoutError:
            await self._reload_quietly()
            return []
        except StopAsyncIteration:  # the last webhook went: unsubscribed
            return []
        batch: list[ChangeEvent] = []
        item: ChangeEvent | Gap | None = first
        while item is not None:
            if isinstance(item, Gap):
                self._missed(item.missed)
            else:
                batch.append(item)
            if len(batch) >= ENQUEUE_BATCH:
                break
            item = events.take_nowait()
        return batch

    def _missed(self, missed: int) -> None:
        if missed != UNKNOWN:
            self._metrics.webhook_events_missed.inc(missed)
        if self._throttle.allow("missed") is not None:
            shown = "an unknown number of" if missed == UNKNOWN else str(missed)
            log.warning("webhooks: %s events were lost before they could be enqueued (the producer fell behind)", shown)

    async def _enqueue(self, events: list[ChangeEvent]) -> None:
        webhooks = self._subscribed()
        rows: list[dict[str, Any]] = []
        for event in events:
            named = self._names.of(event)
            if named is None:
                continue
            name, data = named
            targets = [w.id for w in webhooks if W.subscribed(w.events, name)]
            if not targets:
                continue
            key, body = event_body(name, event.device_id, event.ts, data)
            rows.extend(
                {"webhook_id": w, "event_key": key, "event": name, "device_id": event.device_id, "body": body}
                for w in targets
            )
        if not rows:
            return
        delay = 0.2
        while True:  # the batch is kept until it is stored (the subscription meanwhile fills, bounded)
            began = DatabaseState.attempt()
            try:
                ids = await self.repo.enqueue(rows, now_ms=now_ms())
            except Exception as exc:
                report_failure(self._database, exc, "webhooks: enqueueing %d deliveries failed", len(rows))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._database is not None:
                self._database.succeeded(began)
            break
        self.enqueued += len(ids)
        self._metrics.webhook_enqueued.inc(len(ids))
        if ids:
            self._due.set()

    # --- deliver --------------------------------------------------------------------------------------

    async def _deliver_forever(self) -> None:
        try:
            await self._deliver_rounds()
        finally:  # stopping: what was attempted is written, or it would be sent again after the restart
            if self._unrecorded:
                with contextlib.suppress(Exception):
                    await self.repo.record(self._unrecorded)
                self._unrecorded = []

    async def _deliver_rounds(self) -> None:
        """Rounds of claim, attempt, record. The last round's outcomes ride on the next claim's transaction
        (on SQLite each write transaction waits its turn for the write lock: a round is one turn)."""
        last_prune = 0.0
        last_count = 0.0
        while True:
            began = DatabaseState.attempt()
            try:
                outcomes = list(self._unrecorded)
                claimed = await self._claim(outcomes)
                del self._unrecorded[: len(outcomes)]
                if time.monotonic() - last_count > RELOAD_S:
                    self.pending = await self.repo.pending()
                    self._metrics.webhook_pending.set(self.pending)
                    last_count = time.monotonic()
                if time.monotonic() - last_prune > PRUNE_EVERY_S:
                    await self.repo.prune(before_ms=now_ms() - int(self._log_days * 86_400_000))
                    last_prune = time.monotonic()
            except Exception as exc:
                report_failure(self._database, exc, "webhooks: claiming deliveries failed")
                await asyncio.sleep(POLL_S)
                continue
            if self._database is not None:
                self._database.succeeded(began)
            if claimed:
                await self._send_all(claimed)
                continue
            self._due.clear()
            await wait_set(self._due, await self._idle_for())

    async def _claim(self, outcomes: list[Outcome]) -> list[Claimed]:
        """The next round (and ``outcomes`` written). A stop while the claim runs waits for it and gives
        back what it claimed — cancelled blind, a claim that committed would leave its rows to wait for
        their leases to end."""
        claim = asyncio.ensure_future(
            self.repo.claim(now_ms=now_ms(), limit=self._concurrency * 4, lease_ms=self._lease_ms, record=outcomes)
        )
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                claimed = await claim
                del self._unrecorded[: len(outcomes)]
                await self.repo.release([c.id for c in claimed], now_ms=now_ms())
            raise

    async def _idle_for(self) -> float:
        """Until the next retry is due, at most ``POLL_S``."""
        try:
            due = await self.repo.next_due()
        except Exception:
            return POLL_S
        if due is None:
            return POLL_S
        return min(POLL_S, max(0.01, (due - now_ms()) / 1000))

    async def _send_all(self, claimed: list[Claimed]) -> None:
        """Attempt the claimed deliveries, up to ``concurrency`` at once. Their outcomes wait in
        ``_unrecorded`` for the next claim, which writes them in its transaction; one that waited
        ``RECORD_WITHIN_S`` for a slow neighbour is written at once (with whatever else ended)."""
        limit = asyncio.Semaphore(self._concurrency)
        attempted: set[int] = set()
        ended: asyncio.Queue[tuple[int, Outcome | None]] = asyncio.Queue()

        async def one(delivery: Claimed) -> None:
            outcome: Outcome | None = None
            async with limit:
                try:
                    outcome = await self._send(delivery)
                except Exception as exc:  # nothing to record: tried again when the lease ends
                    report_failure(self._database, exc, "webhooks: delivery %d failed unexpectedly", delivery.id)
            ended.put_nowait((delivery.id, outcome))

        async def collect() -> None:
            oldest: float | None = None  # when the oldest outcome not yet written came in (loop time)
            while len(attempted) < len(claimed):
                try:
                    async with asyncio.timeout_at(None if oldest is None else oldest + RECORD_WITHIN_S):
                        delivery_id, outcome = await ended.get()
                except TimeoutError:
                    await self._record_now()
                    oldest = None
                    continue
                attempted.add(delivery_id)
                if outcome is not None:
                    self._unrecorded.append(outcome)
                    oldest = asyncio.get_running_loop().time() if oldest is None else oldest

        try:
            async with asyncio.TaskGroup() as group:
                for delivery in claimed:
                    group.create_task(one(delivery))
                group.create_task(collect())
        except asyncio.CancelledError:
            # Stopping: what was claimed but not attempted goes back, due now, its attempt not counted
            # (what was attempted is written by _deliver_forever).
            with contextlib.suppress(Exception):
                await self.repo.release([c.id for c in claimed if c.id not in attempted], now_ms=now_ms())
            raise

    async def _record_now(self) -> None:
        # Kept in _unrecorded until written: a failure leaves them for the next claim's transaction, a
        # stop for _deliver_forever's last write (dropped, they would wait for their leases to end).
        outcomes = list(self._unrecorded)
        try:
            await self.repo.record(outcomes)
        except Exception as exc:
            report_failure(self._database, exc, "webhooks: recording %d deliveries failed", len(outcomes))
            return
        del self._unrecorded[: len(outcomes)]

    async def _webhook(self, webhook_id: int) -> WebhookRow | None:
        webhook = self._webhooks.get(webhook_id)
        if webhook is None:
            await self.reload()
            webhook = self._webhooks.get(webhook_id)
        return webhook

    async def _send(self, delivery: Claimed) -> Outcome | None:
        """One attempt; its outcome, to be recorded (None: the webhook was deleted meanwhile, with its log)."""
        webhook = await self._webhook(delivery.webhook_id)
        if webhook is None:
            return None
        assert self._client is not None
        body = delivery.body.encode()
        stamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "X-Telemetra-Event": delivery.event,
            "X-Telemetra-Delivery": str(delivery.id),
            "X-Telemetra-Timestamp": str(stamp),
            "X-Telemetra-Signature": W.signature(webhook.secret, stamp, body),
        }
        started = time.perf_counter()
        status: int | None = None
        retry_after: float | None = None
        self._in_flight += 1
        try:
            response = await self._client.post(webhook.url, content=body, headers=headers)
            status = response.status_code
            delivered = 200 <= status < 300
            error = None if delivered else f"HTTP {status}: {response.text[:ERROR_TEXT]}"
            retry_after = _retry_after(response.headers.get("Retry-After"))
        except httpx.HTTPError as exc:
            delivered = False
            error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT]
        finally:
            self._in_flight -= 1
        seconds = time.perf_counter() - started
        self._metrics.webhook_seconds.observe(seconds)
        retry_at: int | None = None
        if delivered:
            outcome = "delivered"
        elif delivery.attempts < self._max_attempts:
            outcome = "retry"
            delay = W.retry_delay_s(
                delivery.attempts, base_s=self._retry_base_s, max_s=self._retry_max_s, retry_after_s=retry_after
            )
            retry_at = now_ms() + int(delay * 1000)
        else:
            outcome = "failed"
            log.warning(
                "webhook %d: delivery %d (%s) failed %d times, giving up: %s",
                webhook.id,
                delivery.id,
                delivery.event,
                delivery.attempts,
                error,
            )
        self._metrics.webhook_attempts.labels(outcome).inc()
        return Outcome(
            delivery.id,
            finished_at=now_ms(),
            delivered=delivered,
            retry_at=retry_at,
            response_status=status,
            error=error,
            duration_ms=int(seconds * 1000),
        )


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the HTTP-date form is not used by webhook receivers in practice)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
