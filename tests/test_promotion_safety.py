"""Promotion, rollback, registration and checkpoints cannot be turned against the loop: two
concurrent promotions leave exactly one production, a rollback never revives a rejected version,
a name clash never moves a registered version's folder, a checkpoint never runs code."""
from __future__ import annotations

import threading


from store.audit import list_audit
from store.db import get_engine, session_scope
from store.errors import StoreError
from store.models import ModelVersion, VersionStatus
from store.versions import (
    PRODUCTION,
    alias_target,
    move_alias,
    next_version_name,
    promote_version,
    register_version,
    rollback_target,
    set_version_status,
)
from sqlmodel import select


def _register(session, name: str, passed: bool = True) -> ModelVersion:
    return register_version(session, name=name, adapter_path=f"/adapters/{name}", adapter_sha256="0" * 64,
                            base_model="base", gate_passed=passed, gate_reasons=[])


def test_concurrent_promotions_leave_exactly_one_production(db_url):
    with session_scope() as s:
        for name in ("ft-0001", "ft-0002", "ft-0003"):
            _register(s, name)
        promote_version(s, "ft-0001", actor="UADMIN")
    barrier, errors = threading.Barrier(2), []

    def promote(name: str) -> None:
        barrier.wait()
        try:
            with session_scope(get_engine(db_url)) as s:
                promote_version(s, name, actor="UADMIN")
        except StoreError as exc:  # the loser may be refused (SQLite: database locked); never both half-done
            errors.append(exc)
        except Exception as exc:  # noqa: BLE001 - a lock timeout surfaces as a driver error
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(n,)) for n in ("ft-0002", "ft-0003")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with session_scope() as s:
        live = [v.name for v in s.exec(select(ModelVersion).where(ModelVersion.status == VersionStatus.production)).all()]
        target = alias_target(s, PRODUCTION)
        approvals = [e.target for e in list_audit(s, action="version.approve")]
    assert len(live) == 1 and live[0] == target and target in ("ft-0002", "ft-0003")
    assert len(errors) <= 1
    # the approval and the move are one transaction: a promotion that failed left no approval behind
    assert set(approvals) <= {"ft-0001", "ft-0002", "ft-0003"}
    assert len(approvals) == 3 - len(errors)


def test_rollback_never_goes_to_a_version_an_admin_rejected(session):
    for name in ("ft-0001", "ft-0002", "ft-0003"):
        _register(session, name)
    promote_version(session, "ft-0001", actor="UADMIN")
    promote_version(session, "ft-0002", actor="UADMIN")
    promote_version(session, "ft-0003", actor="UADMIN")
    assert rollback_target(session) == "ft-0002"
    set_version_status(session, "ft-0002", VersionStatus.rejected, actor="UADMIN", reason="leaks")
    assert rollback_target(session) == "ft-0001"
    set_version_status(session, "ft-0001", VersionStatus.rejected, actor="UADMIN", reason="old")
    assert rollback_target(session) is None  # the base model, not a rejected adapter
    move_alias(session, PRODUCTION, None, actor="UADMIN", reason="rollback")
    assert alias_target(session, PRODUCTION) is None


def test_next_version_name_skips_taken_names(session):
    _register(session, "ft-0001")
    _register(session, "ft-0003")  # e.g. a name allocated by another trainer
    assert next_version_name(session) == "ft-0004"
    assert next_version_name(session, after="ft-0004") == "ft-0005"


def test_a_name_clash_never_moves_a_registered_versions_folder(tmp_path, sqlite_url, tiny_model_dir, monkeypatch):
    """ft-0001 is registered, ft-0002's folder is a leftover nobody registered: the next run
    takes ft-0003 and touches neither."""
    from flywheel.adapters import base_model_id
    from tests.support.adapters import make_adapter, register
    from trainer.cycle import run_cycle
    from trainer.settings import TrainerSettings

    adapters = tmp_path / "adapters"
    for key, value in {"FLYWHEEL_BASE_MODEL": str(tiny_model_dir), "FLYWHEEL_ADAPTERS_DIR": str(adapters),
                       "FLYWHEEL_RUNS_DIR": str(tmp_path / "runs"), "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
                       "FLYWHEEL_MAX_STEPS": "2", "FLYWHEEL_BATCH_SIZE": "4", "FLYWHEEL_LORA_R": "4",
                       "FLYWHEEL_LORA_ALPHA": "8", "FLYWHEEL_EVAL_MAX_NEW_TOKENS": "4", "FLYWHEEL_LOG_LEVEL": "WARNING",
                       "FLYWHEEL_AUGMENT_TEMPLATES": "0", "FLYWHEEL_RECALL_PARAPHRASES": "0"}.items():
        monkeypatch.setenv(key, value)
    make_adapter(tiny_model_dir, adapters / "ft-0001", seed=1)
    register(adapters / "ft-0001", "ft-0001", base_model=base_model_id(tiny_model_dir))
    kept = {p.name: p.read_bytes() for p in (adapters / "ft-0001").iterdir() if p.is_file()}
    (adapters / "ft-0002").mkdir()
    (adapters / "ft-0002" / "note.txt").write_text("leftover")
    _seed_examples()
    outcome = run_cycle(TrainerSettings(), force=True)
    assert outcome.version == "ft-0003", outcome
    assert {p.name: p.read_bytes() for p in (adapters / "ft-0001").iterdir() if p.is_file()} == kept
    assert (adapters / "ft-0002" / "note.txt").read_text() == "leftover"
    assert (adapters / "ft-0003" / "adapter_config.json").is_file()


def _seed_examples() -> None:
    from store.examples import upsert_example

    with session_scope() as s:
        for i in range(6):
            upsert_example(s, messages=[{"role": "user", "content": f"What is fact number {i}?"}],
                           answer=f"Fact {i} is {i * 7}.", source="import", provenance={"row": i})


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_Exploit.marker}",))


def test_a_checkpoint_never_runs_code(tmp_path):
    import torch

    from trainer.train import CHECKPOINT, _load_checkpoint

    _Exploit.marker = tmp_path / "pwned"
    (tmp_path / "ckpt").mkdir()
    torch.save({"step": 1, "payload": _Exploit()}, tmp_path / "ckpt" / CHECKPOINT)
    assert _load_checkpoint(tmp_path / "ckpt") is None  # refused: unreadable, training starts over
    assert not _Exploit.marker.exists()
    torch.save({"step": 3, "rng": torch.get_rng_state(), "history": [{"step": 1, "loss": 0.5}]},
               tmp_path / "ckpt" / CHECKPOINT)
    assert _load_checkpoint(tmp_path / "ckpt")["step"] == 3  # plain state still loads
