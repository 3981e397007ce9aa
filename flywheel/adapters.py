"""The adapter contract shared by the trainer (writes) and the gateway (loads): a PEFT LoRA
directory, its content digest, and the base model it belongs to."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flywheel.basemodel import resolve

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterError(Exception):
    """An adapter directory is missing files, corrupt, or made for another base model."""


def adapter_digest(adapter_dir: Path | str) -> str:
    """sha256 over the adapter's config and weights (names and contents, in a fixed order)."""
    adapter_dir = Path(adapter_dir)
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = adapter_dir / name
        if not path.is_file():
            raise AdapterError(f"adapter directory {adapter_dir} lacks {name}")
        digest.update(name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def base_model_id(reference: Path | str) -> str:
    """What adapters trained on this base are registered with: its identity (flywheel.basemodel),
    a Hub id at its commit or a digest of a folder's config and weights, never a folder's name."""
    return resolve(reference, weights=False).identity.id


def verify_adapter(adapter_dir: Path | str, *, expected_sha256: str | None = None) -> str:
    """Check the files are there and, when given, match the registered digest; returns the digest."""
    actual = adapter_digest(adapter_dir)
    if expected_sha256 is not None and actual != expected_sha256:
        raise AdapterError(
            f"adapter {adapter_dir} does not match its registered sha256 "
            f"(expected {expected_sha256[:12]}…, found {actual[:12]}…): refusing to load a changed adapter"
        )
    try:
        json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"adapter {adapter_dir} has a corrupt adapter_config.json: {exc}") from exc
    return actual
