"""MQTT topic-filter arithmetic (pure): does a filter match a topic, cover another filter, meet another filter.

Filters follow MQTT 3.1.1 §4.7: ``+`` is one whole level, ``#`` the rest (including the parent level, so
``a/#`` matches ``a``). Topics starting with ``$`` are not matched by a leading wildcard."""

from __future__ import annotations


def topic_matches(topic_filter: str, topic: str) -> bool:
    """True when ``topic`` (no wildcards) matches ``topic_filter``."""
    f, t = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


def filter_covers(general: str, specific: str) -> bool:
    """True when every topic matched by filter ``specific`` is matched by filter ``general``."""
    g, s = general.split("/"), specific.split("/")
    for i, level in enumerate(g):
        if level == "#":
            return True
        if i >= len(s) or s[i] == "#":
            return False
        if level != "+" and level != s[i]:
            return False
        if level == "+" and s[i] == "#":
            return False
    return len(g) == len(s)


def filters_intersect(a: str, b: str) -> bool:
    """True when some topic is matched by both filters."""
    x, y = a.split("/"), b.split("/")
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "#" or q == "#":
            return True
        if p is None or q is None:
            return False
        if p != "+" and q != "+" and p != q:
            return False
    return True
