"""Real PEFT LoRA adapters for tests: random (not zero) LoRA weights so outputs differ from base."""
from __future__ import annotations

from pathlib import Path


def make_adapter(base_dir: Path, out_dir: Path, *, seed: int, r: int = 8, scale: float = 1.0) -> Path:
    """Save a LoRA adapter on `base_dir` with init_lora_weights=False (random A and B) into out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flywheel.basemodel import load_causal_lm

    torch.manual_seed(seed)
    model = load_causal_lm(base_dir, "cpu")
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out_dir)
    return out_dir


def register(adapter_dir: Path, name: str, *, base_model: str, sha256: str | None = None,
             adapter_path: str | None = None):
    """Register an adapter as a version that passed the gate (the trainer's job, done by hand)."""
    from flywheel.adapters import adapter_digest
    from store.db import session_scope
    from store.versions import register_version

    with session_scope() as session:
        return register_version(
            session, name=name, adapter_path=adapter_path or str(adapter_dir),
            adapter_sha256=sha256 or adapter_digest(adapter_dir), base_model=base_model,
            gate_passed=True, gate_reasons=[])


def promote(name: str | None, actor: str = "test-admin") -> None:
    from store.db import session_scope
    from store.versions import PRODUCTION, move_alias

    with session_scope() as session:
        move_alias(session, PRODUCTION, name, actor=actor)


def serve_in_production(name: str | None) -> None:
    """Make production point at `name` (None: the base model), moving the alias only if it points
    elsewhere: for tests that state what production must be, whatever ran before them."""
    from store.db import session_scope
    from store.versions import PRODUCTION, alias_target

    with session_scope() as session:
        current = alias_target(session, PRODUCTION)
    if current != name:
        promote(name)
