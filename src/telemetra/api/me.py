"""``GET /api/v1/me``: who the presented key stands for, so a client (the dashboard) shows only what that
role may do. What each role may do is decided in ``domain.principal``; this only reports it."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from telemetra.api.deps import Caller

router = APIRouter(prefix="/api/v1", tags=["session"])


class Permissions(BaseModel):
    read_fleet: bool = Field(description="reads every device (admin, operator, viewer)")
    operate: bool = Field(description="commands, configuration, alerts, device edits (admin, operator)")
    admin: bool = Field(description="credentials, device creation, claim codes, firmware and rollouts")


class Me(BaseModel):
    role: str = Field(description="admin, operator, viewer, device, gateway or fleet")
    device_id: str | None = Field(description="the device a device or gateway key belongs to")
    trusted_network: bool = Field(description="granted for the client's address, not for a key")
    can: Permissions


@router.get("/me", response_model=Me)
async def me(principal: Caller) -> Me:
    return Me(
        role=principal.role.value,
        device_id=principal.device_id,
        trusted_network=principal.trusted_network,
        can=Permissions(read_fleet=principal.reads_everything, operate=principal.operates, admin=principal.is_admin),
    )
