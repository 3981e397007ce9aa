"""A trainer that cannot hang silently: a run that stops making progress is failed, reported and
its lease freed while it is still hung; a slow run that progresses is not; a run that cannot
start is failed with its reason once, and retried with back-off."""
from __future__ import annotations

import threading
import time
from itertools import pairwise
from pathlib import Path

import pytest

import trainer.cycle
from bot.reports import report_blocks
from store.db import get_engine, session_scope
from store.leases import lease_holder
from store.models import RunStatus
from store.runs import get_run, has_queued_run, list_runs, queue_run, runs_to_report
from store.versions import list_versions
from trainer.cycle import RunNotStarted, run_cycle
from trainer.importer import import_file
from trainer.lease import RunStalled
from trainer.settings import TrainerSettings
from trainer.watch import watch

DATA = Path(__file__).parent / "data"
STALL_S = 5.0


@pytest.fixture
def settings(tmp_path, sqlite_url, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_MEMORY", "false")  # no embedder to load: the run reaches its steps quickly
    with session_scope(get_engine(sqlite_url)) as s:
        import_file(s, DATA / "faq.jsonl")
    return TrainerSettings(
        base_model=str(tiny_model_dir), adapters_dir=tmp_path / "adapters", runs_dir=tmp_path / "runs",
        data_dir=tmp_path / "data", max_steps=6, batch_size=4, lora_r=4, lora_alpha=8, eval_max_new_tokens=4,
        gate_min_eval_items=2, lease_ttl_s=4, heartbeat_s=0.2, stall_s=STALL_S, augment=False,
        watch_poll_s=0.05, watch_max_backoff_s=0.4)


def test_a_hung_step_fails_the_run_reports_it_and_frees_the_lease(settings, sqlite_url, monkeypatch):
    stalled = threading.Event()
    seen: dict = {}

    def hung_training(job, model, device, accelerator, on_step=None):
        on_step(1, 6, {"loss": 1.0})
        seen["noticed"] = stalled.wait(timeout=STALL_S + 10)  # the step hangs; the heartbeat notices
        with session_scope(get_engine(sqlite_url)) as s:  # while this process is still hung:
            seen["holder"] = lease_holder(s, "trainer")
            seen["run"] = list_runs(s)[0]
        on_step(2, 6, {"loss": 0.9})  # it wakes: the next step stops it

    def on_stall():
        stalled.set()

    monkeypatch.setattr(trainer.cycle, "train_on", hung_training)
    started = time.monotonic()
    with pytest.raises(RunStalled):
        run_cycle(settings, owner="hung-trainer", on_stall=on_stall)
    assert seen["noticed"], "no stall was declared"
    assert time.monotonic() - started < STALL_S + 30
    assert seen["holder"] is None  # freed while the run was hung, not when it returned
    run = seen["run"]
    assert run.status == RunStatus.failed
    assert run.error.startswith("stalled: no training progress for ") and "FLYWHEEL_STALL_S=5" in run.error
    with session_scope(get_engine(sqlite_url)) as s:
        assert get_run(s, run.id).error == run.error  # waking up did not overwrite the reason
        assert list_versions(s) == []
        assert [r.id for r in runs_to_report(s)] == [run.id]  # the bot posts it to the admin channel
    shown = report_blocks(run, None, final=True)
    assert ":x: *Failed*: stalled: no training progress" in shown[1]["text"]["text"]


def test_a_slow_run_that_progresses_does_not_stall(settings, sqlite_url, monkeypatch):
    """Longer than FLYWHEEL_STALL_S in all, but each step is quicker: the heartbeat follows the steps."""
    real = trainer.cycle.train_on

    def slow_training(job, model, device, accelerator, on_step=None):
        def slow_step(step, total, point):
            time.sleep(STALL_S / 4)
            on_step(step, total, point)

        return real(job, model, device, accelerator, on_step=slow_step)

    monkeypatch.setattr(trainer.cycle, "train_on", slow_training)
    started = time.monotonic()
    outcome = run_cycle(settings, on_stall=lambda: pytest.fail("a progressing run was declared stalled"))
    assert time.monotonic() - started > STALL_S
    assert outcome.status == "trained"
    with session_scope(get_engine(sqlite_url)) as s:
        assert get_run(s, outcome.run_id).status == RunStatus.succeeded


def test_a_run_that_cannot_start_is_failed_once_and_retried_with_back_off(settings, sqlite_url, monkeypatch):
    attempts: list[float] = []

    def disk_full(session, settings, augmenter=None):
        attempts.append(time.monotonic())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.cycle, "build_snapshot", disk_full)
    with session_scope(get_engine(sqlite_url)) as s:
        queued = queue_run(s, queued_by="UADMIN001")
    assert watch(settings, max_cycles=4) == 4
    assert len(attempts) == 4
    gaps = [b - a for a, b in pairwise(attempts)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2  # doubling, not every poll
    with session_scope(get_engine(sqlite_url)) as s:
        runs = list_runs(s)
        assert not has_queued_run(s)
        assert [r.id for r in runs] == [queued.id]  # four failures, one run, one report
        assert runs[0].status == RunStatus.failed
        assert runs[0].error == ("could not start: the dataset snapshot could not be built: "
                                 "OSError: [Errno 28] No space left on device")
        assert [r.id for r in runs_to_report(s)] == [queued.id]
        assert lease_holder(s, "trainer") is None
        again = queue_run(s, queued_by="UADMIN001")  # someone asks anew: they hear why, too
    with pytest.raises(RunNotStarted) as failed:
        run_cycle(settings)
    assert failed.value.run_id == again.id
