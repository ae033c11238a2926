"""Helpers for the OTA tests: images with known bytes, uploads, and job reads."""

from __future__ import annotations

import random
from typing import Any

import httpx

from tests.conftest import ADMIN


def image(size: int, seed: int = 0) -> bytes:
    """Bytes that differ per seed, so two uploads never share a digest by accident."""
    return random.Random(seed).randbytes(size)


async def upload(
    client: httpx.AsyncClient, data: bytes, *, model: str, version: str, expect: int = 200, **fields: str
) -> dict[str, Any]:
    form = {"model": model, "version": version, **fields}
    r = await client.post("/api/v1/firmware/upload", files={"file": ("fw.bin", data)}, data=form, headers=ADMIN)
    assert r.status_code == expect, r.text
    doc: dict[str, Any] = r.json()
    return doc


async def job(client: httpx.AsyncClient, update_id: int) -> dict[str, Any]:
    r = await client.get(f"/api/v1/ota/updates/{update_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def node_statuses(detail: dict[str, Any]) -> dict[str, str]:
    return {n["node_id"]: n["status"] for n in detail["nodes"]}
