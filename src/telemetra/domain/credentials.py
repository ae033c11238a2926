"""Device secrets and claim codes: random, shown once, stored only as a hash."""

from __future__ import annotations

import hashlib
import secrets

_CLAIM_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: codes are typed in by people


def new_device_secret() -> str:
    return secrets.token_urlsafe(24)  # 192 bits


def new_admin_key() -> str:
    return secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_claim_code() -> str:
    raw = "".join(secrets.choice(_CLAIM_ALPHABET) for _ in range(16))  # 80 bits
    return "-".join(raw[i : i + 4] for i in range(0, 16, 4))


def normalize_claim_code(code: str) -> str:
    return code.strip().upper().replace("-", "").replace(" ", "")


def hash_claim_code(code: str) -> str:
    return hash_secret(normalize_claim_code(code))
