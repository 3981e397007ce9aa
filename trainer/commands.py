"""`flywheel train …` and `flywheel dataset …`: the trainer's command line."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import typer

from store.db import session_scope
from store.errors import StoreError
from trainer.lease import LeaseBusy, LeaseLost, RunStalled
from trainer.settings import TrainerSettings

train_app = typer.Typer(help="Fine-tune, evaluate and register model versions.", no_args_is_help=True)
dataset_app = typer.Typer(help="Import examples and build dataset snapshots.", no_args_is_help=True)
EXIT_BUSY = 3
EXIT_STALLED = 4


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _settings(**overrides) -> TrainerSettings:
    from pydantic import ValidationError

    try:
        base = TrainerSettings()
        return base.model_copy(update={k: v for k, v in overrides.items() if v is not None}) if overrides else base
    except ValidationError as exc:
        _fail(f"bad trainer settings: {exc}")


@train_app.command("run")
def run(
    force: bool = typer.Option(False, "--force", help="Train even if the dataset did not change"),
    max_steps: int | None = typer.Option(None, min=1, help="Stop after this many optimizer steps"),
    epochs: int | None = typer.Option(None, min=1, help="Epochs over the training split"),
    learning_rate: float | None = typer.Option(None, "--lr", min=0.0, help="Peak learning rate"),
) -> None:
    """One cycle: build the dataset, fine-tune, evaluate, gate and register a version. Started on
    several processes (`accelerate launch --config_file deploy/accelerate/ddp.yaml --num_processes N
    -m flywheel train run`), they train one adapter together and rank 0 does the rest."""
    from trainer.cycle import RunNotStarted, run_cycle  # torch, transformers, datasets: ~8 s, only for a run
    from trainer.modeling import ModelLoadError  # torch, transformers: ~4 s
    from trainer.train import TrainingError, join_processes  # torch: ~3 s

    settings = _settings(max_steps=max_steps, epochs=epochs, learning_rate=learning_rate)
    accelerator = join_processes(settings)
    if accelerator is not None:
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
    try:
        outcome = run_cycle(settings, force=force, accelerator=accelerator, on_stall=_exit_stalled)
    except LeaseBusy as exc:
        typer.secho(str(exc), fg="yellow", err=True)
        raise typer.Exit(EXIT_BUSY)
    except (ModelLoadError, StoreError) as exc:
        _fail(str(exc))
    except (TrainingError, LeaseLost, RunStalled) as exc:  # the run is already marked failed with this error
        _fail(f"training run failed: {exc}", code=1)
    except RunNotStarted as exc:  # marked failed with the reason; the scheduler (CronJob) tries again later
        _fail(f"training run could not start: {exc}", code=1)
    finally:
        if accelerator is not None:
            accelerator.end_training()
    if outcome.status == "helped":
        typer.echo(outcome.message)
        return
    if outcome.status == "skipped":
        typer.secho(outcome.message, fg="yellow")
        return
    typer.secho(f"run {outcome.run_id}: {outcome.message}", fg="green" if outcome.gate_passed else "yellow")
    for reason in outcome.report["gate"]["reasons"]:
        typer.echo(f"  - {reason}")
    for name, row in outcome.report["metrics"].items():
        typer.echo(f"  {name:<11} F1 {row['token_f1'] if row['token_f1'] is not None else '-'}  "
                   f"EM {row['exact_match'] if row['exact_match'] is not None else '-'}  golden {row['golden']}")


def _exit_stalled() -> None:
    """The run made no progress for FLYWHEEL_STALL_S and is failed, its lease freed (trainer.lease):
    end this process, whose training is hung where no exception reaches it (a stuck kernel, a
    collective waiting on a dead rank); the CronJob or the container's restart policy takes over."""
    typer.secho("error: the training run stalled (no progress for FLYWHEEL_STALL_S); it was marked failed",
                fg="red", err=True)
    os._exit(EXIT_STALLED)


def _stopped_by_launcher(signum, _frame) -> None:
    """The launcher stops every rank with SIGTERM when one fails: raise, so that rank 0 marks its
    run failed (run_cycle) instead of dying with it 'running'."""
    from trainer.train import TrainingError  # torch (~3 s); run() imported it before this can fire

    raise TrainingError(f"stopped by signal {signal.Signals(signum).name}: another rank failed or the launcher was stopped")


@train_app.command("watch")
def watch_cmd(
    once: bool = typer.Option(False, "--once", help="Check once (and run if due), then exit"),
    max_cycles: int | None = typer.Option(None, min=1, help="Exit after this many cycles"),
    poll: float | None = typer.Option(None, min=0.1, help="Seconds between checks"),
) -> None:
    """Run cycles when enough new data arrived (after a cooldown) or when an admin queued one."""
    from trainer.train import launched_processes  # torch: ~3 s, only when the watch starts
    from trainer.watch import watch  # the cycle's modules: ~0.4 s more, only when the watch starts

    if launched_processes() > 1:
        _fail("`train watch` runs in one process; start several processes with `train run` "
              "(deploy/k8s/trainer-multigpu.yaml), one launch per cycle")

    settings = _settings(watch_poll_s=poll)
    cycles = watch(settings, max_cycles=max_cycles, once=once, on_stall=_exit_stalled)
    typer.echo(f"watch stopped after {cycles} cycle(s)")


@dataset_app.command("import")
def import_cmd(
    file: Path = typer.Argument(..., help="JSONL/JSON/CSV/TSV of question,answer or text,label rows"),
    source: str = typer.Option("import", help="Source name recorded on the examples"),
) -> None:
    """Import examples from a file; a file with bad rows imports nothing and lists them."""
    from flywheel.embedding import EmbedderError  # the embedder's module and numpy: ~0.5 s, only for an import
    from flywheel.memory import Memory, MemorySettings  # numpy
    from trainer.importer import ImportFileError, import_file  # the memory, the cleaning: only for an import

    try:
        with session_scope() as s:
            result = import_file(s, file, source=source, memory=Memory(MemorySettings()))
    except (ImportFileError, StoreError, EmbedderError) as exc:
        _fail(str(exc))
    typer.echo(f"imported {file.name}: {result.created} new, {result.existing} already known, {result.golden} golden, "
               f"{result.remembered} in the correction memory")


@dataset_app.command("build")
def build_cmd() -> None:
    """Build (or reuse) the dataset snapshot from the store and print its counts."""
    from trainer.dataset import build_snapshot  # datasets (Arrow): ~2 s, only when a snapshot is built

    with session_scope() as s:
        snap = build_snapshot(s, _settings())
    state = "unchanged, reused" if snap.reused else "new"
    typer.echo(f"snapshot {snap.row.id} ({state}) {snap.row.content_hash[:12]} at {snap.row.path}")
    typer.echo(json.dumps(snap.counts, indent=2))


@dataset_app.command("export")
def export_cmd(
    out: Path = typer.Argument(..., help="Directory to write one JSONL per split to"),
    snapshot: int | None = typer.Option(None, help="Snapshot id (default: the latest)"),
    fmt: str = typer.Option("chat", "--format", help="chat | openai | openai-preference | trl-dpo | trl-kto "
                            "(field by field: trainer/export.py)"),
) -> None:
    """Write a snapshot (redacted and cleaned as it trains) to OUT. `chat` copies the snapshot's
    files (chat JSONL per split + the datasets copy); the others write `{split}.jsonl` in the
    named public format (the preference ones: items with a better and a rejected answer)."""
    from store.datasets import get_snapshot, latest_snapshot  # ~0.2 s, only for an export
    from trainer.dataset import SPLITS  # datasets (Arrow): ~2 s, only for an export
    from trainer.export import FORMATS, write_format  # datasets

    if fmt not in FORMATS:
        _fail(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")

    with session_scope() as s:
        row = get_snapshot(s, snapshot) if snapshot is not None else latest_snapshot(s)
    if row is None:
        _fail(f"no snapshot {snapshot}" if snapshot is not None else "no snapshot yet; run `flywheel dataset build`")
    src = Path(row.path)
    if not (src / "manifest.json").is_file():
        _fail(f"snapshot {row.id}'s files are gone from {src}; rebuild with `flywheel dataset build`")
    if out.exists() and any(out.iterdir()):
        _fail(f"{out} exists and is not empty; choose a new directory")
    if fmt == "chat":
        shutil.copytree(src, out, dirs_exist_ok=True)
        typer.echo(f"exported snapshot {row.id} ({row.content_hash[:12]}) to {out}")
        return
    counts = write_format(src, out, fmt, SPLITS)
    (out / "manifest.json").write_text(json.dumps({"format": fmt, "snapshot": row.id,
                                                   "content_hash": row.content_hash, "records": counts}, indent=2))
    typer.echo(f"exported snapshot {row.id} ({row.content_hash[:12]}) as {fmt} to {out}: "
               + ", ".join(f"{k} {v}" for k, v in counts.items()))
