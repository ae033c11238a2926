"""Retention as one capability: a pass at start and every ``interval_s``, deleting per tier what its
policy keeps no longer (``storage.retention``), with its progress in the metrics; and the storage
figures (``storage.usage``) refreshed after each pass. It also tells ``/aggregate`` how far back each
tier still holds a device's data, so an answer never silently mixes in a tier that lost part of the
range (``domain.rollups.choose_resolution``). After each pass the figures go to ``on_budget`` with where
the database stands against its budget (``domain.budget``, with the hysteresis of its clear margin,
decided from the open alert's severity): the ``storage_budget`` alert's cadence.
App layer: it wires storage and metrics."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from telemetra.aio import every
from telemetra.domain.budget import BudgetState, settled_budget_state
from telemetra.domain.rollups import TIERS
from telemetra.domain.timeutil import now_ms
from telemetra.metrics import Metrics
from telemetra.storage.faults import DatabaseState, report_failure
from telemetra.storage.retention import Days, PassResult, Policies, RetentionRepository
from telemetra.storage.usage import Usage, UsageQueries
from telemetra.supervise import Failures, Supervisor

log = logging.getLogger(__name__)

# The figures, and what the alert should be given the open one's severity (None: none open).
OnBudget = Callable[[Usage, Callable[[str | None], BudgetState | None]], Awaitable[None]]


class Retention:
    name = "retention"

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        defaults: Days,
        metrics: Metrics,
        failures: Failures,
        interval_s: float = 3600.0,
        chunk: int = 5000,
        budget_bytes: int = 0,
        warn_days: float = 14.0,
        warn_fraction: float = 0.0,
        clear_margin: float = 0.0,
        on_budget: OnBudget | None = None,
        database: DatabaseState | None = None,
    ) -> None:
        self._database = database
        self.repo = RetentionRepository(engine, defaults)
        self.usage_queries = UsageQueries(engine)
        self._metrics = metrics
        self._supervisor = Supervisor("retention", failures)
        self._interval_s = interval_s
        self._chunk = chunk
        self._budget = budget_bytes or None
        self._warn_days = warn_days
        self._warn_fraction = warn_fraction
        self._clear_margin = clear_margin
        self._on_budget = on_budget
        self.policies = Policies(defaults)
        self.last: PassResult | None = None
        self.passes = 0

    async def __aenter__(self) -> Retention:
        self.policies = await self.repo.policies()
        await self._supervisor.__aenter__()
        self._supervisor.spawn("passes", self._forever)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._supervisor.__aexit__(exc_type, exc, tb)

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": "ok" if self._supervisor.alive("passes") else "down", "passes": self.passes}
        if self.last is not None:
            body["last"] = {"deleted": self.last.deleted, "seconds": round(self.last.seconds, 3)}
        return body

    async def kept_since(self, device_id: str) -> dict[str, int]:
        if not any(self.policies.defaults.of(t) for t in TIERS) and not self.policies.models:
            return {}
        return self.policies.kept_since(await self.repo.device_model(device_id), now_ms())

    async def reload(self) -> None:
        self.policies = await self.repo.policies()

    async def _forever(self) -> None:
        def failed(exc: Exception) -> None:
            report_failure(self._database, exc, "retention pass failed; trying again in %s s", self._interval_s)

        await every(self._interval_s, self.run_pass, failed=failed)

    async def run_pass(self) -> PassResult:
        await self.reload()

        def progress(tier: str, n: int) -> None:
            self._metrics.retention_deleted.labels(tier).inc(n)

        result = await self.repo.run_pass(self.policies, now_ms=now_ms(), chunk=self._chunk, on_chunk=progress)
        self.last = result
        self.passes += 1
        self._metrics.retention_runs.inc()
        self._metrics.retention_seconds.set(result.seconds)
        if any(result.deleted.values()):
            log.info("retention deleted %s in %.1f s", result.deleted, result.seconds)
        usage = await self.usage()
        if self._on_budget is not None:
            await self._on_budget(usage, lambda previous: self.budget_state(usage, previous))
        return result

    async def usage(self, top: int = 10) -> Usage:
        usage = await self.usage_queries.usage(now_ms=now_ms(), top=top, budget_bytes=self._budget)
        for tier, figures in usage.tiers.items():
            self._metrics.storage_bytes.labels(tier).set(figures.bytes)
            self._metrics.storage_rows.labels(tier).set(figures.rows)
        if usage.days_left is not None:
            self._metrics.storage_days_left.set(usage.days_left)
        state = self.budget_state(usage)
        if state is not None:
            log.warning("%s", state.message)
        return usage

    def budget_state(self, usage: Usage, previous: str | None = None) -> BudgetState | None:
        """Where the database stands against its budget, given the open alert's severity (None: none)."""
        return settled_budget_state(
            previous,
            budget_bytes=usage.budget_bytes,
            used_bytes=usage.database_bytes,
            growth_bytes_per_day=usage.growth_bytes_per_day,
            warn_days=self._warn_days,
            warn_fraction=self._warn_fraction,
            clear_margin=self._clear_margin,
        )
