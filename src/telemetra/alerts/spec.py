"""A rule as a client (the API) or the rules file writes it: each field bounded, then the checks across
fields (``domain.rules.check_rule``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from telemetra.domain.ids import DEVICE_ID_PATTERN
from telemetra.domain.rules import MAX_FOR_S, check_rule

KEY_PATTERN = r"^[^\x00]{1,128}$"
# Within what a double holds and JSON writes back; a threshold past it means nothing for a reading.
MAX_THRESHOLD = 1e300

Op = Literal[">", ">=", "<", "<=", "==", "!="]
Severity = Literal["info", "warning", "critical"]
Kind = Literal["threshold", "rate", "nodata", "offline"]
RuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]
Threshold = Annotated[float, Field(ge=-MAX_THRESHOLD, le=MAX_THRESHOLD, allow_inf_nan=False)]
DeviceList = Annotated[list[Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]], Field(max_length=10_000)]
ModelList = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[^\x00]+$")]], Field(max_length=1000)
]
ForS = Annotated[int, Field(ge=0, le=MAX_FOR_S)]
# domain.rules.DEVICE_KINDS; "device" or "gateway", each at most once.
KindList = Annotated[list[Literal["device", "gateway"]], Field(min_length=1, max_length=2)]


class RuleSpec(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "greenhouse too hot",
                    "key": "temperature",
                    "op": ">",
                    "value": 35,
                    "for_s": 60,
                    "severity": "critical",
                }
            ]
        },
    )

    name: RuleName
    kind: Kind = "threshold"
    key: Annotated[str, Field(pattern=KEY_PATTERN)] | None = None
    op: Op | None = None
    value: Threshold | None = None
    for_s: ForS = 0
    clear_value: Threshold | None = None
    severity: Severity = "warning"
    devices: DeviceList | None = None
    models: ModelList | None = None
    kinds: KindList | None = None
    enabled: bool = True

    def checked(self) -> dict[str, Any]:
        values = self.model_dump()
        check_rule(values)
        return values


class RulePatch(BaseModel):
    """Any of a rule's fields; the result is checked as a whole."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"value": 38, "enabled": True}]}
    )

    name: RuleName | None = None
    kind: Kind | None = None
    key: Annotated[str, Field(pattern=KEY_PATTERN)] | None = None
    op: Op | None = None
    value: Threshold | None = None
    for_s: ForS | None = None
    clear_value: Threshold | None = None
    severity: Severity | None = None
    devices: DeviceList | None = None
    models: ModelList | None = None
    kinds: KindList | None = None
    enabled: bool | None = None
