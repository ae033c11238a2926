"""Who is calling, once their credential has been checked."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.Enum):
    ADMIN = "admin"
    DEVICE = "device"
    GATEWAY = "gateway"
    FLEET = "fleet"
    ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    device_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def owns(self, device_id: str) -> bool:
        return self.role is Role.ADMIN or self.device_id == device_id


ADMIN = Principal(Role.ADMIN)
FLEET = Principal(Role.FLEET)
ANONYMOUS = Principal(Role.ANONYMOUS)
