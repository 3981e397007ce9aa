"""One training cycle: lease → dataset snapshot → LoRA fine-tune → evaluate candidate vs
production vs base → gate → register the version and its report. A run that fails is marked
failed with its error and registers nothing; a run that is killed is failed by the next one."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

from flywheel.adapters import base_model_id
from flywheel.logs import get_logger
from store.datasets import get_snapshot
from store.db import get_engine, session_scope
from store.errors import InvalidStateError
from store.models import RunStatus
from store.runs import (
    fail_stale_runs,
    finish_run,
    has_queued_run,
    last_successful_run,
    record_progress,
    start_run,
    update_run,
)
from store.versions import alias_version, next_version_name, register_version
from trainer.dataset import build_snapshot
from trainer.lease import TrainerLease
from trainer.settings import TrainerSettings

log = get_logger("trainer.cycle")


@dataclass
class Outcome:
    status: str  # trained / skipped
    message: str
    run_id: int | None = None
    version: str | None = None
    gate_passed: bool | None = None
    report: dict | None = None


def not_enough_data(session, snap, settings, force: bool) -> str | None:
    """Why this snapshot should not be trained on, in words; None when it should."""
    n_train = snap.counts.get("train", 0)
    if n_train < settings.min_train_examples:
        return (f"too little data: {n_train} training item(s), at least {settings.min_train_examples} needed. "
                "Import question/answer pairs with `flywheel dataset import FILE` or collect more feedback.")
    last = last_successful_run(session)
    if not force and last is not None and last.dataset_snapshot_id is not None:
        prev = get_snapshot(session, last.dataset_snapshot_id)
        if prev is not None and prev.content_hash == snap.row.content_hash:
            return (f"no new data since run {last.id} (dataset {snap.row.content_hash[:12]} unchanged); "
                    "use --force to train on it again")
    return None


def checkpoint_key(snapshot_hash: str, settings: TrainerSettings) -> str:
    blob = json.dumps({"data": snapshot_hash, "hp": settings.hyperparams()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_cycle(settings: TrainerSettings | None = None, *, force: bool = False, owner: str | None = None) -> Outcome:
    settings = settings or TrainerSettings()
    engine = get_engine()
    with TrainerLease(ttl_s=settings.lease_ttl_s, heartbeat_s=settings.heartbeat_s, owner=owner,
                      engine=engine) as lease:
        with session_scope(engine) as s:
            for dead in fail_stale_runs(s, 0):  # we hold the lease: any 'running' run is dead
                log.warning("marked dead run failed", run=dead.id, error=dead.error)
            augmenter = None
            if settings.augment:
                from trainer.augment import augment_examples as augmenter
            snap = build_snapshot(s, settings, augmenter=augmenter)
            reason = not_enough_data(s, snap, settings, force)
            if reason is not None:
                run_id = None
                if has_queued_run(s):  # tell whoever queued it why nothing happened
                    run = start_run(s, owner=lease.owner, hyperparams=settings.hyperparams())
                    finish_run(s, run.id, RunStatus.cancelled, error=reason)
                    run_id = run.id
                log.info("training skipped", reason=reason)
                return Outcome("skipped", reason, run_id=run_id)
            run = start_run(s, owner=lease.owner, hyperparams=settings.hyperparams())
            update_run(s, run.id, dataset_snapshot_id=snap.row.id)
            lease.run_id = run.id
        try:
            return _train_and_register(settings, snap, run.id, lease, engine)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.error("run failed", run=run.id, error=error, trace=traceback.format_exc(limit=5))
            with session_scope(engine) as s:
                finish_run(s, run.id, RunStatus.failed, error=error)
            raise


def _train_and_register(settings: TrainerSettings, snap, run_id: int, lease: TrainerLease, engine) -> Outcome:
    from trainer.encode import encode_rows
    from trainer.evaluate import eval_memory, evaluate
    from trainer.gate import gate
    from trainer.notes import noted_rows
    from trainer.preference import preference_items
    from trainer.modeling import add_lora, load_base_model, load_tokenizer, pick_device, use_bf16
    from trainer.report import build_report, write_report
    from trainer.train import clear_checkpoint, save_adapter, train_lora

    device = pick_device(settings.device)
    bf16 = use_bf16(device, settings.bf16)
    base_dir = Path(settings.base_model)
    tokenizer = load_tokenizer(base_dir)
    model = add_lora(load_base_model(base_dir, device), settings)
    train_rows = list(snap.dataset["train"])
    memory = eval_memory(train_rows, settings)  # what production's memory would hold
    noted = noted_rows(train_rows, memory)
    encoded, too_long = encode_rows(tokenizer, train_rows + noted, settings.max_length)
    n_facts = sum(1 for row in train_rows if not row["augmented"])
    log.info("training rows", rows=len(train_rows), with_notes=len(noted), facts=n_facts)
    if too_long:
        log.warning("items over max_length dropped", count=too_long, max_length=settings.max_length)
    ckpt = Path(settings.runs_dir).resolve() / "checkpoints" / checkpoint_key(snap.row.content_hash, settings)

    def on_step(step: int, total: int, point: dict) -> None:
        lease.check()
        with session_scope(engine) as s:
            record_progress(s, run_id, step=step, total_steps=total, point=point)

    with session_scope(engine) as s:
        update_run(s, run_id, total_steps=0)
    pairs = preference_items(settings.objective, tokenizer, snap.dataset, settings.max_length)
    if pairs is not None:
        log.info("preference items", objective=settings.objective, items=len(pairs))
    train = train_lora(model, encoded, settings, device=device, bf16=bf16, pad_id=tokenizer.pad_token_id,
                       checkpoint_dir=ckpt, on_step=on_step, n_facts=n_facts, pairs=pairs)
    lease.check()
    base_id = base_model_id(base_dir)
    with session_scope(engine) as s:
        production = alias_version(s, "production")
    if production is not None and production.base_model != base_id:
        log.warning("production adapter is for another base model; comparing with the base model only",
                    production=production.name, its_base=production.base_model, ours=base_id)
        production = None
    ds = snap.dataset
    splits = {"recall": list(ds["recall"]), "never_taught": list(ds["eval"]), "general": list(ds["general"]),
              "golden": list(ds["golden"])}
    results = evaluate(model, tokenizer, splits, snap.counts.get("labels", []), settings, device=device,
                       production=production, memory=memory)
    verdict = gate(results, settings, final_train_loss=train.final_loss)
    lease.check()
    adapters_dir = Path(settings.adapters_dir).resolve()
    adapters_dir.mkdir(parents=True, exist_ok=True)
    staging = adapters_dir / f".staging-run-{run_id}"
    shutil.rmtree(staging, ignore_errors=True)
    digest = save_adapter(model, staging)
    report_dir = Path(settings.runs_dir).resolve() / f"run-{run_id}"
    with session_scope(engine) as s:
        name = None
        for _attempt in range(20):
            # The next free name: never a registered version's, never over a folder that exists
            # (a leftover of an unregistered run stays where it is, untouched).
            name = next_version_name(s, after=name)
            target = adapters_dir / name
            if target.exists():
                continue
            try:
                os.replace(staging, target)  # atomic; refused if another run just took the folder
            except OSError:
                continue
            report = build_report(version=name, run_id=run_id, snapshot=snap.row, results=results, verdict=verdict,
                                  train=train, hyperparams=settings.hyperparams(), base_model=base_id)
            _json, png = write_report(report, report_dir)
            try:
                register_version(s, name=name, adapter_path=str(target), adapter_sha256=digest, base_model=base_id,
                                 gate_passed=verdict.passed, gate_reasons=verdict.reasons, report=report,
                                 report_path=str(png), run_id=run_id, dataset_snapshot_id=snap.row.id)
                break
            except InvalidStateError:  # another trainer registered this name meanwhile
                os.replace(target, staging)
        else:
            raise InvalidStateError("could not allocate a version name for the adapter")
        finish_run(s, run_id, RunStatus.succeeded, model_version=name)
    clear_checkpoint(ckpt)
    log.info("run finished", run=run_id, version=name, gate_passed=verdict.passed, reasons=verdict.reasons)
    verdict_words = "passed the gate" if verdict.passed else "did not pass the gate"
    return Outcome("trained", f"registered {name}: {verdict_words}", run_id=run_id, version=name,
                   gate_passed=verdict.passed, report=report)
