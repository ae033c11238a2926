"""The ``storage_budget`` alert as the retention pass sees the storage figures (``domain.budget``): one
open alert at most, raised when the database nears or passes its budget, raised again when its severity
changes, cleared when the database is back within it by the clear margin (the hysteresis). Its changes
are announced like every alert's."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from telemetra.domain.timeutil import now_ms
from telemetra.storage.budget_alerts import BudgetAlertRepository, Decide
from telemetra.storage.usage import Usage

Announce = Callable[[list[dict[str, Any]], str], Awaitable[None]]


class BudgetAlerts:
    def __init__(self, repo: BudgetAlertRepository, *, announce: Announce) -> None:
        self.repo = repo
        self._announce = announce

    async def open_severity(self) -> str | None:
        return await self.repo.open_severity()

    async def check(self, usage: Usage, decide: Decide) -> None:
        """Settle the alert: ``decide`` maps the open alert's severity to what it should be now."""
        payload = {
            "budget_bytes": usage.budget_bytes,
            "database_bytes": usage.database_bytes,
            "growth_bytes_per_day": usage.growth_bytes_per_day,
            "days_left": usage.days_left,
        }
        changed, how = await self.repo.settle(decide, value=usage.days_left, payload=payload, now_ms=now_ms())
        if how is not None:
            await self._announce(changed, how)
