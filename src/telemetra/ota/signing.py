"""Ed25519 firmware signatures (``cryptography``).

What is signed is the image's SHA-256 digest — the 32 raw bytes, not the hex text. A device computes
SHA-256 while it downloads (it must anyway, to check ``sha256``) and verifies the signature over that
digest with the public key published at ``GET /ota/public-key``; nothing needs the whole image in memory
on either side. Ed25519 is deterministic, so a signature is derived from the stored digest whenever it
is asked for: a key configured (or rotated) later signs every stored image at once.
"""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningKeyError(ValueError):
    """The configured signing key is not an Ed25519 private key."""


class Signer:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        public = private_key.public_key()
        self.public_raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_pem = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
        self._sign = lru_cache(maxsize=4096)(self._sign_uncached)

    @classmethod
    def from_text(cls, text: str) -> Signer:
        """A PEM private key (PKCS#8, as ``openssl genpkey -algorithm ed25519`` writes it), or the raw
        32-byte seed in base64 or hex."""
        stripped = text.strip()
        if stripped.startswith("-----BEGIN"):
            try:
                key = serialization.load_pem_private_key(stripped.encode(), password=None)
            except (ValueError, TypeError) as exc:
                raise SigningKeyError(f"cannot read the PEM signing key: {exc}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise SigningKeyError("the signing key must be an Ed25519 private key")
            return cls(key)
        raw = _raw_seed(stripped)
        if raw is None:
            raise SigningKeyError("the signing key must be a PEM Ed25519 private key, or 32 bytes as base64 or hex")
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    def private_pem(self) -> str:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()

    def _sign_uncached(self, sha256_hex: str) -> str:
        return base64.b64encode(self._key.sign(bytes.fromhex(sha256_hex))).decode()

    def sign_digest(self, sha256_hex: str) -> str:
        """Base64 Ed25519 signature over the 32 raw bytes of ``sha256_hex``."""
        return self._sign(sha256_hex)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()


def verify(public_raw: bytes, sha256_hex: str, signature_b64: str) -> bool:
    """What a device does: check ``signature_b64`` over the image digest with the published key."""
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(
            base64.b64decode(signature_b64), bytes.fromhex(sha256_hex)
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def _raw_seed(text: str) -> bytes | None:
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            raw = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == 32:
            return raw
    return None
