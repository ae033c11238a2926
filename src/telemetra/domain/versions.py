"""Firmware versions are semantic versions (semver.org 2.0.0), compared as such — never as strings
(seed lesson: "newer" by string inequality offered downgrades, and "1.10.0" sorts before "1.2.0").

What is accepted, and what it is stored as:

| given         | stored        | why |
|---------------|---------------|-----|
| `1.2.3`, `1.2.3-rc.1`, `1.2.3+build.7` | as given | strict semver |
| `v1.2.3`, `V1.2.3-rc.1` | `1.2.3`, `1.2.3-rc.1` | a git tag's leading `v` is not part of the version |
| `1.2`, `1.2-rc.1` | `1.2.0`, `1.2.0-rc.1` | a missing patch is zero, as every build system reads it |
| `1`, `2024`   | refused | a bare number is as likely a build counter as a major version |
| `01.2.3`, `1.2.3.4`, `1.2.x`, `latest` | refused | not semver; guessing would misorder updates |

Build metadata (`+…`) is kept in the stored string but, as semver says, does not take part in ordering.
"""

from __future__ import annotations

import re

import semver

from telemetra.domain.errors import InvalidInput

MAX_VERSION_LENGTH = 64
# Two or three numeric parts; semver itself validates the rest (leading zeros, pre-release, build).
_SHAPE = re.compile(r"^[vV]?(\d+\.\d+(?:\.\d+)?)([-+].*)?$")


def parse_version(text: str) -> semver.Version | None:
    """The version ``text`` stands for, normalised as the table above says; None if it is not one."""
    candidate = text.strip()
    if not candidate or len(candidate) > MAX_VERSION_LENGTH:
        return None
    match = _SHAPE.match(candidate)
    if match is None:
        return None
    try:
        return semver.Version.parse(match.group(1) + (match.group(2) or ""), optional_minor_and_patch=True)
    except ValueError:
        return None


def normalize_version(text: str, *, field: str = "version") -> str:
    """The stored form of ``text``, or ``InvalidInput`` naming ``field``."""
    version = parse_version(text)
    if version is None:
        raise InvalidInput(
            f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH, optionally -prerelease and +build; "
            "a leading 'v' and a missing patch are accepted)",
            field=field,
        )
    return str(version)


def is_prerelease(text: str) -> bool:
    version = parse_version(text)
    return version is not None and version.prerelease is not None


def same_version(a: str | None, b: str | None) -> bool:
    """Whether two version strings name the same release (``v1.2`` is ``1.2.0``); plain string equality
    for strings that are not semver, so a device reporting an odd version still matches itself."""
    if a is None or b is None:
        return False
    pa, pb = parse_version(a), parse_version(b)
    if pa is None or pb is None:
        return a.strip() == b.strip()
    return pa.compare(pb) == 0
