"""The storage budget alert, decided once. Pure.

With a disk budget set (``TELEMETRA_STORAGE_BUDGET_BYTES``), the database's size against it: past the
budget is **critical**; within ``warn_days`` of it at the last week's growth, or past ``warn_fraction``
of it, a **warning**; otherwise nothing (an open alert is cleared). ``GET /api/v1/storage`` and the
``storage_budget`` alert both ask this, so they never disagree.

The size moves with every ingest and retention pass, so a database that hovers at a threshold would
clear and raise the alert again (or flip its severity) on every pass. ``settled_budget_state`` adds
hysteresis (``TELEMETRA_STORAGE_CLEAR_MARGIN``, a share of the budget): raising and escalating happen at
the thresholds, at once; an open **critical** goes down to a warning only once the database is below the
budget minus the margin, and an open **warning** clears only once both the share used is below
``warn_fraction`` minus the margin and the size projected ``warn_days`` ahead is below the budget minus
the margin.
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
WARNING: Final = "warning"
CRITICAL: Final = "critical"


@dataclass(frozen=True, slots=True)
class BudgetState:
    severity: str  # "warning" or "critical"
    reason: str  # PAST, USED or SOON
    message: str


def days_left(budget_bytes: int | None, used_bytes: int, growth_bytes_per_day: float) -> float | None:
    """Days until the budget is reached at this growth (0: reached; None: no budget, or no growth)."""
    if not budget_bytes:
        return None
    if used_bytes >= budget_bytes:
        return 0.0
    return (budget_bytes - used_bytes) / growth_bytes_per_day if growth_bytes_per_day > 0 else None


def budget_state(
    *, budget_bytes: int | None, used_bytes: int, days_left: float | None, warn_days: float, warn_fraction: float
) -> BudgetState | None:
    """Where the database stands against its budget (None: no budget, or well within it): what raises
    the alert, whatever was open before."""
    if not budget_bytes:
        return None
    share = used_bytes / budget_bytes
    if used_bytes >= budget_bytes:
        return BudgetState(CRITICAL, PAST, f"storage: {used_bytes} bytes, past the budget of {budget_bytes}")
    if warn_fraction and share >= warn_fraction:
        return BudgetState(WARNING, USED, f"storage: {share:.0%} of the budget of {budget_bytes} bytes used")
    if days_left is not None and days_left <= warn_days:
        return BudgetState(
            WARNING, SOON, f"storage: the budget of {budget_bytes} bytes is reached in {days_left:.1f} days"
        )
    return None


def settled_budget_state(
    previous: str | None,
    *,
    budget_bytes: int | None,
    used_bytes: int,
    growth_bytes_per_day: float,
    warn_days: float,
    warn_fraction: float,
    clear_margin: float,
) -> BudgetState | None:
    """What the alert should be, given the severity of the one open now (``previous``; None: none open):
    ``budget_state`` with hysteresis. A margin of 0 is ``budget_state`` itself."""
    raised = budget_state(
        budget_bytes=budget_bytes,
        used_bytes=used_bytes,
        days_left=days_left(budget_bytes, used_bytes, growth_bytes_per_day),
        warn_days=warn_days,
        warn_fraction=warn_fraction,
    )
    if not budget_bytes or not clear_margin or previous not in (WARNING, CRITICAL):
        return raised
    if raised is not None and (raised.severity == CRITICAL or previous == WARNING):
        return raised  # raising and escalating are never held back
    margin = clear_margin * budget_bytes
    if previous == CRITICAL and used_bytes >= budget_bytes - margin:
        return BudgetState(
            CRITICAL,
            PAST,
            f"storage: {used_bytes} bytes, at the budget of {budget_bytes}"
            f" (critical until below {budget_bytes - margin:.0f})",
        )
    if raised is not None:
        return raised  # a critical gone down to a warning that holds without the margin
    share = used_bytes / budget_bytes
    if warn_fraction and share >= warn_fraction - clear_margin:
        return BudgetState(
            WARNING,
            USED,
            f"storage: {share:.0%} of the budget of {budget_bytes} bytes used"
            f" (a warning until below {warn_fraction - clear_margin:.0%})",
        )
    if growth_bytes_per_day > 0 and used_bytes + growth_bytes_per_day * warn_days >= budget_bytes - margin:
        left = (budget_bytes - used_bytes) / growth_bytes_per_day
        return BudgetState(
            WARNING,
            SOON,
            f"storage: the budget of {budget_bytes} bytes is reached in {left:.1f} days"
            f" (a warning until the size {warn_days:g} days ahead is below {budget_bytes - margin:.0f} bytes)",
        )
    return None
