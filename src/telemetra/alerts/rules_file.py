"""``TELEMETRA_RULES_FILE``: rules kept in git, loaded at start. JSON (a list of rules, or
``{"rules": [...]}``) or TOML (``[[rules]]`` tables), each rule as ``POST /api/v1/rules`` takes it. The
file's rules are known by name: a start makes the stored file rules exactly what the file says (added,
changed, removed); rules made through the API are left alone."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from telemetra.alerts.spec import RuleSpec
from telemetra.domain.errors import InvalidInput


def load_rules_file(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    try:
        document: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"rules file {path}: {exc}", field="rules_file") from None
    items = document.get("rules", []) if isinstance(document, dict) else document
    if not isinstance(items, list):
        raise InvalidInput(f"rules file {path}: expected a list of rules", field="rules_file")
    rules = []
    for n, item in enumerate(items):
        try:
            rules.append(RuleSpec.model_validate(item).checked())
        except ValidationError as exc:
            first = exc.errors()[0]
            place = ".".join(str(p) for p in first["loc"])
            raise InvalidInput(
                f"rules file {path}, rule {n + 1}: {place}: {first['msg']}", field="rules_file"
            ) from None
        except InvalidInput as exc:
            raise InvalidInput(f"rules file {path}, rule {n + 1}: {exc}", field="rules_file") from None
    return rules
