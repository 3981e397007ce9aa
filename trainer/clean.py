"""Keys for deduplication. (Slack text → model text is flywheel.prompt.normalize, the one
normalization that serving and training share.)"""
from __future__ import annotations

import re


def normalize_for_hash(text: str) -> str:
    """Case, punctuation and spacing do not make an item different (exact-dedup key)."""
    text = text.lower()
    text = re.sub(r"[^\w\s\[\]]", " ", text)
    return " ".join(text.split())
