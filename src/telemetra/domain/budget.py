"""The storage budget alert, decided once. Pure.

With a disk budget set (``TELEMETRA_STORAGE_BUDGET_BYTES``), the database's size against it: past the
budget is **critical**; within ``warn_days`` of it at the last week's growth, or past ``warn_fraction``
of it, a **warning**; otherwise nothing (an open alert is cleared). ``GET /api/v1/storage`` and the
``storage_budget`` alert both ask this, so they never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

STORAGE_BUDGET: Final = "storage_budget"  # the alert's type
# The alert is about the server, not a device: its device_id is empty (no device id can be, ids.py).
NO_DEVICE: Final = ""
PAST: Final = "past"  # the database is at or over the budget
USED: Final = "used"  # over warn_fraction of it
SOON: Final = "days_left"  # at the last week's growth, the budget is reached within warn_days


@dataclass(frozen=True, slots=True)
class BudgetState:
    severity: str  # "warning" or "critical"
    reason: str  # PAST, USED or SOON
    message: str


def budget_state(
    *, budget_bytes: int | None, used_bytes: int, days_left: float | None, warn_days: float, warn_fraction: float
) -> BudgetState | None:
    """Where the database stands against its budget (None: no budget, or well within it)."""
    if not budget_bytes:
        return None
    share = used_bytes / budget_bytes
    if used_bytes >= budget_bytes:
        return BudgetState("critical", PAST, f"storage: {used_bytes} bytes, past the budget of {budget_bytes}")
    if warn_fraction and share >= warn_fraction:
        return BudgetState("warning", USED, f"storage: {share:.0%} of the budget of {budget_bytes} bytes used")
    if days_left is not None and days_left <= warn_days:
        return BudgetState(
            "warning", SOON, f"storage: the budget of {budget_bytes} bytes is reached in {days_left:.1f} days"
        )
    return None
