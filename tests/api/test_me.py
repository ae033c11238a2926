"""``GET /api/v1/me`` reports the caller's role and what it may do (the dashboard hides what it may not)."""

from __future__ import annotations

from tests.conftest import ADMIN, AppFactory

OPERATOR_KEY = "operator-key-for-the-me-tests-0123456789"
VIEWER_KEY = "viewer-key-for-the-me-tests-0123456789"


async def test_me_names_the_role_and_its_permissions(app_factory: AppFactory) -> None:
    async with app_factory(operator_keys=[OPERATOR_KEY], viewer_keys=[VIEWER_KEY]) as t:
        secret = await t.create_device("me-dev")
        expected = {
            "admin": (ADMIN, {"read_fleet": True, "operate": True, "admin": True}, None),
            "operator": ({"X-API-Key": OPERATOR_KEY}, {"read_fleet": True, "operate": True, "admin": False}, None),
            "viewer": (
                {"Authorization": f"Bearer {VIEWER_KEY}"},
                {"read_fleet": True, "operate": False, "admin": False},
                None,
            ),
            "device": ({"X-API-Key": secret}, {"read_fleet": False, "operate": False, "admin": False}, "me-dev"),
        }
        for role, (headers, can, device_id) in expected.items():
            r = await t.client.get("/api/v1/me", headers=headers)
            assert r.status_code == 200, r.text
            assert r.json() == {"role": role, "device_id": device_id, "trusted_network": False, "can": can}
        r = await t.client.get("/api/v1/me")
        assert r.status_code == 401 and r.json()["field"] == "X-API-Key"
        r = await t.client.get("/api/v1/me", headers={"X-API-Key": "nobody-issued-this"})
        assert r.status_code == 401 and r.json()["field"] == "X-API-Key"
