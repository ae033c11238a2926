"""The storage_budget alert's hysteresis (``domain.budget.settled_budget_state``), pure: raising and
escalating at the thresholds, at once; going down or clearing only a margin (a share of the budget)
below them, so a database hovering at a threshold does not raise and clear the alert on every pass."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from telemetra.domain.budget import (
    CRITICAL,
    PAST,
    SOON,
    USED,
    WARNING,
    BudgetState,
    budget_state,
    days_left,
    settled_budget_state,
)

RANK = {None: 0, WARNING: 1, CRITICAL: 2}


def raising_rule(budget: int, used: int, growth: float, warn_days: float, warn_fraction: float) -> BudgetState | None:
    """The thresholds alone, no hysteresis: what the settled state is checked against."""
    return budget_state(
        budget_bytes=budget,
        used_bytes=used,
        days_left=days_left(budget, used, growth),
        warn_days=warn_days,
        warn_fraction=warn_fraction,
    )


def settle(previous: str | None, used: int, **more: float) -> BudgetState | None:
    figures: dict[str, float] = {
        "budget_bytes": 1000,
        "growth_bytes_per_day": 0.0,
        "warn_days": 14,
        "warn_fraction": 0.9,
        "clear_margin": 0.05,
    }
    figures |= more
    return settled_budget_state(
        previous,
        budget_bytes=int(figures["budget_bytes"]),
        used_bytes=used,
        growth_bytes_per_day=figures["growth_bytes_per_day"],
        warn_days=figures["warn_days"],
        warn_fraction=figures["warn_fraction"],
        clear_margin=figures["clear_margin"],
    )


def run(used: list[int], previous: str | None = None, **more: float) -> list[str | None]:
    """The severities one pass after another, each pass seeing the one before's."""
    seen = []
    for u in used:
        state = settle(previous, u, **more)
        previous = state.severity if state else None
        seen.append(previous)
    return seen


def changes(severities: list[str | None], start: str | None) -> int:
    return sum(a != b for a, b in zip([start, *severities], severities, strict=False))


def test_a_warning_is_raised_at_the_threshold_and_clears_only_below_it_minus_the_margin() -> None:
    assert run([890, 900, 899, 870, 851, 850, 849, 899]) == [
        None,  # below the warning's 90 %
        WARNING,  # raised at it
        WARNING,  # just below: held
        WARNING,
        WARNING,
        WARNING,  # 85 %: still held
        None,  # below 90 % − 5 %: cleared
        None,  # and raised again only at 90 %
    ]
    held = settle(WARNING, 870)
    assert held is not None and (held.severity, held.reason) == (WARNING, USED)
    assert held.message == "storage: 87% of the budget of 1000 bytes used (a warning until below 85%)"


def test_a_critical_goes_down_to_a_warning_only_below_the_budget_minus_the_margin() -> None:
    assert run([1000, 999, 960, 950, 949, 1000, 940, 851, 849]) == [
        CRITICAL,
        CRITICAL,  # just within the budget: held
        CRITICAL,
        CRITICAL,  # at the budget − 5 %: held
        WARNING,  # below it: down to a warning (95 % is past the warning's 90 %)
        CRITICAL,  # escalating is never held back
        WARNING,
        WARNING,  # held down to 85 %
        None,
    ]
    held = settle(CRITICAL, 980)
    assert held is not None and (held.severity, held.reason) == (CRITICAL, PAST)
    assert "critical until below 950" in held.message


def test_a_critical_well_within_the_budget_clears_at_once() -> None:
    assert settle(CRITICAL, 100) is None
    assert settle(CRITICAL, 100, warn_fraction=0) is None


def test_a_warning_raised_by_the_growth_is_held_while_the_projection_is_within_the_margin() -> None:
    # 10 bytes a day: 14 days ahead of 860 is 1000, the budget (days left: 14).
    growth = {"growth_bytes_per_day": 10.0, "warn_fraction": 0}
    raised = settle(None, 860, **growth)
    assert raised is not None and (raised.severity, raised.reason) == (WARNING, SOON)
    assert settle(None, 859, **growth) is None  # 14.1 days left: not raised
    held = settle(WARNING, 859, **growth)
    assert held is not None and (held.severity, held.reason) == (WARNING, SOON)
    assert settle(WARNING, 810, **growth) is not None  # 14 days ahead: 950, the budget − 5 %
    assert settle(WARNING, 809, **growth) is None
    assert settle(WARNING, 859, growth_bytes_per_day=0.0, warn_fraction=0) is None  # no growth: nothing to hold


def test_no_budget_clears_whatever_was_open() -> None:
    assert settle(CRITICAL, 10**9, budget_bytes=0) is None
    assert settle(WARNING, 10**9, budget_bytes=0) is None


def test_days_left() -> None:
    assert days_left(None, 5, 1.0) is None and days_left(0, 5, 1.0) is None
    assert days_left(1000, 1000, 0.0) == 0.0 and days_left(1000, 1200, 1.0) == 0.0
    assert days_left(1000, 900, 10.0) == 10.0
    assert days_left(1000, 900, 0.0) is None


budgets = st.integers(10_000, 10**12)
fractions = st.floats(0.05, 0.95)
margins = st.floats(0.01, 0.2)
previous_states = st.sampled_from([None, WARNING, CRITICAL])
growths = st.one_of(st.just(0.0), st.floats(0.0, 10**10))


@given(previous_states, budgets, st.floats(0, 1.5), growths, st.floats(0, 60), fractions)
def test_a_zero_margin_is_the_raising_rule_itself(
    previous: str | None, budget: int, share: float, growth: float, warn_days: float, warn_fraction: float
) -> None:
    used = int(share * budget)
    raw = raising_rule(budget, used, growth, warn_days, warn_fraction)
    both = {"growth_bytes_per_day": growth, "warn_days": warn_days, "warn_fraction": warn_fraction}
    assert settle(previous, used, budget_bytes=budget, clear_margin=0, **both) == raw
    assert settle(None, used, budget_bytes=budget, clear_margin=0.1, **both) == raw  # nothing open: no hysteresis


@given(previous_states, budgets, st.floats(0, 1.5), growths, st.floats(0, 60), fractions, margins)
def test_raising_is_never_held_back_and_far_enough_below_it_clears(
    previous: str | None,
    budget: int,
    share: float,
    growth: float,
    warn_days: float,
    warn_fraction: float,
    margin: float,
) -> None:
    used = int(share * budget)
    figures = {"growth_bytes_per_day": growth, "warn_days": warn_days, "warn_fraction": warn_fraction}
    raw = raising_rule(budget, used, growth, warn_days, warn_fraction)
    state = settle(previous, used, budget_bytes=budget, clear_margin=margin, **figures)
    severity = state.severity if state else None
    assert RANK[severity] >= RANK[raw.severity if raw else None]  # never below what the thresholds say
    assert RANK[severity] <= max(RANK[previous], RANK[raw.severity if raw else None])  # holds, never escalates
    if used < budget * (1 - margin):
        assert severity != CRITICAL
    below_share = used < (warn_fraction - margin) * budget
    below_projection = used + growth * warn_days < budget * (1 - margin)
    if below_share and below_projection:
        assert state is None


def oscillating(center: float, half_band: float) -> st.SearchStrategy[list[int]]:
    """Sizes within ± half_band of center, pass after pass (rounded to bytes)."""
    return st.lists(st.floats(-0.999, 0.999).map(lambda x: round(center + x * half_band)), min_size=2, max_size=40)


@given(st.data(), budgets, st.floats(0.3, 0.85), margins, previous_states)
def test_no_flip_flop_at_the_warning_threshold(
    data: st.DataObject, budget: int, warn_fraction: float, margin: float, start: str | None
) -> None:
    margin = min(margin, warn_fraction / 2)
    used = data.draw(oscillating(warn_fraction * budget, margin * budget / 2))
    seen = run(used, start, budget_bytes=budget, warn_fraction=warn_fraction, clear_margin=margin)
    assert changes(seen[1:], seen[0]) <= 1, seen  # after the first pass: one change at most
    if start is None:
        assert changes(seen, None) <= 1, seen  # raised once, and held


@given(st.data(), budgets, fractions, margins, previous_states)
def test_no_flip_flop_at_the_budget(
    data: st.DataObject, budget: int, warn_fraction: float, margin: float, start: str | None
) -> None:
    margin = min(margin, warn_fraction / 2)
    used = data.draw(oscillating(budget, margin * budget / 2))
    seen = run(used, start, budget_bytes=budget, warn_fraction=warn_fraction, clear_margin=margin)
    assert changes(seen[1:], seen[0]) <= 1, seen
    opened = [i for i, severity in enumerate(seen) if severity is not None]
    assert None not in seen[opened[0] :] if opened else True, seen  # once open, it stays open


@given(st.data(), budgets, st.floats(1, 60), st.floats(0.05, 0.5), margins, previous_states)
def test_no_flip_flop_at_the_projected_budget(
    data: st.DataObject, budget: int, warn_days: float, ahead: float, margin: float, start: str | None
) -> None:
    """The warning from the growth: the size ``warn_days`` ahead hovers around the budget."""
    margin = min(margin, ahead)  # so that the database itself stays below the budget
    growth = ahead * budget / warn_days  # `ahead` of the budget is what warn_days of growth adds
    used = data.draw(oscillating(budget - growth * warn_days, margin * budget / 2))
    figures = {"growth_bytes_per_day": growth, "warn_days": warn_days, "warn_fraction": 0}
    seen = run(used, start, budget_bytes=budget, clear_margin=margin, **figures)
    assert changes(seen[1:], seen[0]) <= 1, seen
    if start is None:
        assert changes(seen, None) <= 1, seen
