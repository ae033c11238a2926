"""Presence ("online"), decided here and nowhere else. Pure.

A device is online while it is flagged online (it sent something, or its broker session / Last Will /
state message said so) and was heard from within its expected interval: the most specific ``offline``
rule's ``for_s`` (``domain.rules.offline_after_s``), else the ``offline_after_s`` setting. The presence
sweep (``alerts.engine``) writes ``online = false`` once that interval has passed, so the flag itself
comes to say the same thing in every process and after a restart; reads apply the interval as well, so
they never say "online" in the moments before the next sweep.
"""

from __future__ import annotations


def is_online(flag: bool | None, last_seen_at: int | None, *, now: int, offline_after_s: int) -> bool:
    return bool(flag) and last_seen_at is not None and now - last_seen_at < offline_after_s * 1000


def offline_cutoff(now: int, offline_after_s: int) -> int:
    """Heard from before this (epoch ms): offline."""
    return now - offline_after_s * 1000
