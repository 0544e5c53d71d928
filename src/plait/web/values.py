"""Values a status.json can carry: no NaN or infinity (JSON has neither), settings as one flat table."""

from __future__ import annotations

import math
from typing import Any

from plait.settings.config import to_dict


def finite(value: Any) -> Any:
    """`value`, or None for a float NaN or infinity (json.dumps would write invalid JSON)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def settings_table(config: Any) -> dict[str, Any]:
    """A run's config as `{"section.key": value}`, as its config.toml says it (objects as their setting's text);
    values other than numbers, booleans and text are shown as text."""
    flat: dict[str, Any] = {}

    def walk(table: dict[str, Any], prefix: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk(to_dict(config), "")
    return flat
