"""Lists in environment variables, read the same way by every package's settings."""
from __future__ import annotations

import json


def split_csv(value, strip: str | None = None) -> list[str]:
    """'a,b,c' (or a JSON list) → ['a', 'b', 'c']; blanks dropped, `strip` chars trimmed too."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        value = json.loads(value) if value.startswith("[") else value.split(",")
    items = (str(v).strip().strip(strip) if strip else str(v).strip() for v in value)
    return [v for v in items if v]
