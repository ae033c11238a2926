"""Reconnect delays: fast first retries, doubling up to a low cap, randomised."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` gives the delay before the next attempt; ``reset()`` after a success.

    The cap is low on purpose: what we reconnect to is usually a broker that restarted, back within a
    second, and every second spent waiting is a second in which nothing is consumed (or no revocation is
    applied). The jitter (each delay drawn from [½, 1] of its nominal value) keeps a fleet of processes from
    reconnecting in lockstep.
    """

    def __init__(self, first_s: float, cap_s: float) -> None:
        if not 0 < first_s <= cap_s:
            raise ValueError("need 0 < first_s <= cap_s")
        self._first = first_s
        self._cap = cap_s
        self._nominal = first_s

    def next(self) -> float:
        delay = random.uniform(0.5, 1.0) * self._nominal
        self._nominal = min(self._cap, self._nominal * 2)
        return delay

    def reset(self) -> None:
        self._nominal = self._first
