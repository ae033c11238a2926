"""Who is calling, once their credential has been checked — and the one place that says what each role may do.

Roles (SPEC §1):
- ``admin``: everything;
- ``operator``: everything but credentials and keys — it writes telemetry for any device, edits, disables
  and deletes devices, sends commands and configuration, handles alerts; creating a device (which issues its
  secret), rotating credentials and claim codes stay with the admin;
- ``viewer``: reads only, of every device;
- ``device`` / ``gateway``: their own data (a gateway also writes for its children); ``fleet``: writes for any
  device id (seed 001's shared ``DEVICE_API_KEYS``);
- ``anonymous``: no key; only the device paths an operator opened by setting.

Key-less requests from a trusted network (``TELEMETRA_TRUSTED_NETWORKS``) get the configured role instead
of ``anonymous``: that is how the seeds' dashboards and apps, which send no key, get in.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Role(enum.Enum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"
    DEVICE = "device"
    GATEWAY = "gateway"
    FLEET = "fleet"
    ANONYMOUS = "anonymous"


# The roles a key from the settings (or a trusted network) may carry, strongest first.
STAFF_ROLES = (Role.ADMIN, Role.OPERATOR, Role.VIEWER)
_READS_ALL = frozenset(STAFF_ROLES)
_OPERATES = frozenset((Role.ADMIN, Role.OPERATOR))
_NO_WRITES = frozenset((Role.VIEWER, Role.ANONYMOUS))


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    device_id: str | None = None
    trusted_network: bool = False  # granted for the client's address, not for a key

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def reads_everything(self) -> bool:
        """Admin, operator and viewer read every device's data."""
        return self.role in _READS_ALL

    @property
    def operates(self) -> bool:
        """May change things other than credentials and keys (devices, commands, config, alerts)."""
        return self.role in _OPERATES

    @property
    def writes_telemetry(self) -> bool:
        """May send data at all (which devices for is ``ingest.service``'s to decide)."""
        return self.role not in _NO_WRITES

    @property
    def writes_for_any_device(self) -> bool:
        """Names the device in the body or path and may auto-register it (not bound to one device)."""
        return self.role in (Role.ADMIN, Role.OPERATOR, Role.FLEET)

    def owns(self, device_id: str) -> bool:
        """May read ``device_id``'s data."""
        return self.role in _READS_ALL or self.device_id == device_id


ADMIN = Principal(Role.ADMIN)
OPERATOR = Principal(Role.OPERATOR)
VIEWER = Principal(Role.VIEWER)
FLEET = Principal(Role.FLEET)
ANONYMOUS = Principal(Role.ANONYMOUS)


def matches_any(key: str, candidates: Iterable[str]) -> bool:
    # Compare against every candidate so timing does not tell which one (or whether any) matched.
    found = False
    encoded = key.encode()
    for candidate in candidates:
        found |= hmac.compare_digest(encoded, candidate.encode())
    return found


def parse_networks(values: Iterable[str]) -> tuple[IpNetwork, ...]:
    """CIDRs (or single addresses) → networks; ``ValueError`` names the first bad one."""
    networks: list[IpNetwork] = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP network (use CIDR notation such as 192.168.1.0/24)") from None
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Which settings key carries which role, and which networks get a role without a key. Pure."""

    admin_keys: tuple[str, ...] = ()
    operator_keys: tuple[str, ...] = ()
    viewer_keys: tuple[str, ...] = ()
    trusted_networks: tuple[IpNetwork, ...] = ()
    trusted_role: Role = Role.VIEWER

    def __post_init__(self) -> None:
        if self.trusted_role not in STAFF_ROLES:
            raise ValueError(f"a trusted network grants admin, operator or viewer, not {self.trusted_role.value}")

    def staff(self, key: str) -> Principal | None:
        """The admin/operator/viewer principal a key stands for, or None when it is none of them."""
        # Every list is compared in full, whatever matched first (see matches_any).
        matched = [
            matches_any(key, self.admin_keys),
            matches_any(key, self.operator_keys),
            matches_any(key, self.viewer_keys),
        ]
        for role, hit in zip(STAFF_ROLES, matched, strict=True):
            if hit:
                return Principal(role)
        return None

    def keyless(self, client_host: str | None) -> Principal:
        """A request without a key: the trusted role when it comes from a trusted network, else anonymous."""
        if not self.trusted_networks or not client_host:
            return ANONYMOUS
        try:
            address = ipaddress.ip_address(client_host)
        except ValueError:  # a unix socket path or a test client name
            return ANONYMOUS
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.trusted_networks):
            return Principal(self.trusted_role, trusted_network=True)
        return ANONYMOUS
