"""One training cycle: lease → dataset snapshot → LoRA fine-tune → evaluate candidate vs
production vs base → gate → register the version and its report. A run that fails is marked
failed with its error and registers nothing; a run that is killed is failed by the next one.

Started on several processes (`accelerate launch … -m flywheel train run`, trainer.train.join_processes),
rank 0 alone takes the lease, builds the snapshot and the training items and hands them to the
other ranks; all of them train the one adapter together; rank 0 alone evaluates, gates and
registers, while the others exit. Rank 0 leaving before the hand-out (nothing to train, a busy
lease, an error) tells the others there is nothing to train, so none waits for a timeout."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from flywheel.adapters import base_model_id
from flywheel.logs import get_logger
from store.datasets import get_snapshot
from store.db import get_engine, session_scope
from store.errors import InvalidStateError
from store.models import RunStatus
from store.runs import (
    fail_before_start,
    fail_stale_runs,
    finish_run,
    has_queued_run,
    last_successful_run,
    record_progress,
    start_run,
    update_run,
)
from store.versions import alias_version, next_version_name, register_version
from trainer.augment import augment_examples
from trainer.dataset import build_snapshot
from trainer.lease import TrainerLease
from trainer.settings import TrainerSettings

log = get_logger("trainer.cycle")


@dataclass
class Outcome:
    status: str  # trained / skipped / helped (a rank other than 0 that trained beside it)
    message: str
    run_id: int | None = None
    version: str | None = None
    gate_passed: bool | None = None
    report: dict | None = None


class RunNotStarted(RuntimeError):
    """The cycle failed before its run started (snapshot build, disk full); the run is marked
    failed with the reason (once for a streak of such failures) and the caller retries later."""

    def __init__(self, error: str, run_id: int | None) -> None:
        super().__init__(error)
        self.run_id = run_id


@dataclass
class TrainingInput:
    """What every rank trains on, built once by rank 0 (and handed to the others)."""
    settings: TrainerSettings  # rank 0's, so every rank plans the same steps
    encoded: list  # trainer.encode.Encoded
    n_facts: int
    pad_id: int
    checkpoint_dir: Path
    pairs: list | None = None  # preference items (FLYWHEEL_OBJECTIVE sft+dpo / kto)


class OtherRanks:
    """Rank 0's line to the other ranks, which wait for one message: the training input, or None
    when there is nothing to train. Leaving the block before handing it out sends None. Alone
    (no accelerator) there is nobody to tell."""

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.told = accelerator is None

    def hand_out(self, job: TrainingInput | None) -> None:
        from trainer.train import share_from_rank_0

        if not self.told:
            self.told = True
            share_from_rank_0(self.accelerator, job)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.hand_out(None)


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


def run_cycle(settings: TrainerSettings, *, force: bool = False, owner: str | None = None,
              accelerator=None, on_stall: Callable[[], None] | None = None) -> Outcome:
    """One cycle. `accelerator` (trainer.train.join_processes): this process is one of several
    launched together; ranks other than 0 only train beside rank 0. `on_stall`: called (from the
    lease's thread) once a run that made no progress for settings.stall_s is failed."""
    if accelerator is not None and not accelerator.is_main_process:
        return train_beside_rank_0(accelerator)
    engine = get_engine()
    with OtherRanks(accelerator) as others, \
            TrainerLease(ttl_s=settings.lease_ttl_s, heartbeat_s=settings.heartbeat_s, stall_s=settings.stall_s,
                         owner=owner, engine=engine, on_stall=on_stall) as lease:
        opened = _open_run(settings, lease, engine, force)
        if isinstance(opened, Outcome):
            return opened
        snap, run_id = opened
        try:
            return _train_and_register(settings, snap, run_id, lease, engine, others)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.error("run failed", run=run_id, error=error, trace=traceback.format_exc(limit=5))
            if not lease.stalled:  # a stalled run is failed already, with the stall as its reason
                with session_scope(engine) as s:
                    finish_run(s, run_id, RunStatus.failed, error=error)
            raise


def _open_run(settings: TrainerSettings, lease: TrainerLease, engine, force: bool):
    """Under the lease: fail dead runs, build the snapshot and start a run on it; (snapshot, run
    id), or the skipped Outcome when there is nothing (new) to train on. RunNotStarted when the
    snapshot cannot be built."""
    with session_scope(engine) as s:
        for dead in fail_stale_runs(s, 0):  # we hold the lease: any 'running' run is dead
            log.warning("marked dead run failed", run=dead.id, error=dead.error)
    snap = _snapshot(settings, lease, engine)
    with session_scope(engine) as s:
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
        lease.follow(run.id)
    return snap, run.id


def _snapshot(settings: TrainerSettings, lease: TrainerLease, engine):
    """The dataset snapshot; failing (disk full, a bad row, the database) it fails a run with the
    reason instead of leaving the queued run waiting, and raises RunNotStarted."""
    try:
        with session_scope(engine) as s:
            return build_snapshot(s, settings, augmenter=augment_examples if settings.augment else None)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        log.error("run could not start", error=error, trace=traceback.format_exc(limit=5))
        with session_scope(engine) as s:
            run = fail_before_start(s, owner=lease.owner, hyperparams=settings.hyperparams(),
                                    error=f"the dataset snapshot could not be built: {error}")
        raise RunNotStarted(error, run.id if run is not None else None) from exc


def _train_and_register(settings: TrainerSettings, snap, run_id: int, lease: TrainerLease, engine,
                        others: OtherRanks) -> Outcome:
    from trainer.evaluate import eval_memory  # torch, transformers: ~2 s, only when a run trains
    from trainer.modeling import load_tokenizer, pick_device  # torch, transformers

    device = others.accelerator.device if others.accelerator is not None else pick_device(settings.device)
    tokenizer = load_tokenizer(Path(settings.base_model))
    memory = eval_memory(list(snap.dataset["train"]), settings)  # what production's memory would hold
    lease.progressed()
    job = _training_input(settings, snap, tokenizer, memory)
    lease.progressed()
    others.hand_out(job)
    model = lora_model(settings, device)
    lease.progressed()
    train = _train(job, model, device, run_id, lease, engine, others.accelerator)
    if train.adapter_state is not None:  # FSDP left the model sharded: rank 0 evaluates a whole copy
        model = lora_model(settings, device, adapter_state=train.adapter_state)
    lease.progressed()
    base_id = base_model_id(Path(settings.base_model))
    results, verdict = _evaluate(settings, snap, engine, model, tokenizer, memory, train, device, base_id,
                                 lease.progressed)
    lease.progressed()
    return _register(settings, snap, run_id, engine, model, results, verdict, train, base_id, job.checkpoint_dir)


def _training_input(settings: TrainerSettings, snap, tokenizer, memory) -> TrainingInput:
    """The snapshot's training rows (and their copies with retrieved notes) encoded, the
    preference items, and where checkpoints of this data and these settings go."""
    from trainer.encode import encode_rows
    from trainer.notes import noted_rows
    from trainer.preference import preference_items

    train_rows = list(snap.dataset["train"])
    noted = noted_rows(train_rows, memory)
    encoded, too_long = encode_rows(tokenizer, train_rows + noted, settings.max_length)
    n_facts = sum(1 for row in train_rows if not row["augmented"])
    log.info("training rows", rows=len(train_rows), with_notes=len(noted), facts=n_facts)
    if too_long:
        log.warning("items over max_length dropped", count=too_long, max_length=settings.max_length)
    pairs = preference_items(settings.objective, tokenizer, snap.dataset, settings.max_length)
    if pairs is not None:
        log.info("preference items", objective=settings.objective, items=len(pairs))
    ckpt = Path(settings.runs_dir).resolve() / "checkpoints" / checkpoint_key(snap.row.content_hash, settings)
    return TrainingInput(settings=settings, encoded=encoded, n_facts=n_facts, pad_id=tokenizer.pad_token_id,
                         checkpoint_dir=ckpt, pairs=pairs)


def lora_model(settings: TrainerSettings, device, *, adapter_state: dict | None = None):
    """The base model with a LoRA adapter: freshly initialised from the seed (so one process and
    rank 0 of several start from the same weights), or holding `adapter_state`."""
    import torch
    from peft import set_peft_model_state_dict

    from trainer.modeling import add_lora, load_base_model

    base = load_base_model(Path(settings.base_model), device, settings.quantize)
    torch.manual_seed(settings.seed)
    model = add_lora(base, settings)
    if adapter_state is not None:
        set_peft_model_state_dict(model, adapter_state)
    return model


def _train(job: TrainingInput, model, device, run_id: int, lease: TrainerLease, engine, accelerator):
    """Rank 0's training: each step checks the lease, tells it of the progress and records the
    progress in the store."""
    def on_step(step: int, total: int, point: dict) -> None:
        lease.progressed()
        with session_scope(engine) as s:
            record_progress(s, run_id, step=step, total_steps=total, point=point)

    with session_scope(engine) as s:
        update_run(s, run_id, total_steps=0)
    return train_on(job, model, device, accelerator, on_step=on_step)


def train_on(job: TrainingInput, model, device, accelerator, on_step=None):
    """train_lora on the handed-out input, as every rank calls it."""
    from trainer.modeling import use_bf16
    from trainer.train import train_lora

    return train_lora(model, job.encoded, job.settings, device=device, bf16=use_bf16(device, job.settings.bf16),
                      pad_id=job.pad_id, checkpoint_dir=job.checkpoint_dir, on_step=on_step, n_facts=job.n_facts,
                      pairs=job.pairs, accelerator=accelerator)


def train_beside_rank_0(accelerator) -> Outcome:
    """A rank other than 0: wait for rank 0's training input, train on this rank's share of every
    batch, and leave evaluation and registration to rank 0."""
    from trainer.train import share_from_rank_0

    rank = accelerator.process_index
    job = share_from_rank_0(accelerator, None)
    if job is None:
        return Outcome("skipped", f"rank {rank}: rank 0 has nothing for the other ranks to train")
    train_on(job, lora_model(job.settings, accelerator.device), accelerator.device, accelerator)
    return Outcome("helped", f"rank {rank}: trained beside rank 0, which evaluates and registers")


def _evaluate(settings: TrainerSettings, snap, engine, model, tokenizer, memory, train, device, base_id: str,
              on_batch: Callable[[], None]):
    """Candidate vs production (when it is for this base) vs base on the held-out splits, then
    the gate: (results, verdict). `on_batch` after each evaluation batch (the lease's progress)."""
    from trainer.evaluate import evaluate
    from trainer.gate import gate

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
                       production=production, memory=memory, on_batch=on_batch)
    return results, gate(results, settings, final_train_loss=train.final_loss)


def _register(settings: TrainerSettings, snap, run_id: int, engine, model, results, verdict, train,
              base_id: str, checkpoint_dir: Path) -> Outcome:
    """Save the adapter under the next free version name, write the report, register the version,
    finish the run and drop its checkpoints."""
    from trainer.report import build_report, write_report
    from trainer.train import clear_checkpoint, save_adapter

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
                                 report_path=str(png), report_plot=png.read_bytes(), run_id=run_id,
                                 dataset_snapshot_id=snap.row.id)
                break
            except InvalidStateError:  # another trainer registered this name meanwhile
                os.replace(target, staging)
        else:
            raise InvalidStateError("could not allocate a version name for the adapter")
        finish_run(s, run_id, RunStatus.succeeded, model_version=name)
    clear_checkpoint(checkpoint_dir)
    log.info("run finished", run=run_id, version=name, gate_passed=verdict.passed, reasons=verdict.reasons)
    verdict_words = "passed the gate" if verdict.passed else "did not pass the gate"
    return Outcome("trained", f"registered {name}: {verdict_words}", run_id=run_id, version=name,
                   gate_passed=verdict.passed, report=report)
