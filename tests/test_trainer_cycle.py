"""The whole cycle on the tiny model: import → snapshot → LoRA → evaluate → gate → register,
the CLI, a run killed mid-training, and two trainers at once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.adapters import base_model_id, verify_adapter
from store.db import get_engine, session_scope
from store.leases import lease_holder
from store.runs import get_run, list_runs
from store.versions import list_versions, move_alias, report_plot
from trainer.cycle import run_cycle
from trainer.gate import gate
from trainer.lease import LeaseBusy
from tests.support.waiting import wait_until
from trainer.settings import TrainerSettings

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(tmp_path, sqlite_url, tiny_model_dir, monkeypatch):
    values = {
        "FLYWHEEL_BASE_MODEL": str(tiny_model_dir), "FLYWHEEL_ADAPTERS_DIR": str(tmp_path / "adapters"),
        "FLYWHEEL_RUNS_DIR": str(tmp_path / "runs"), "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
        "FLYWHEEL_MAX_STEPS": "6", "FLYWHEEL_BATCH_SIZE": "4", "FLYWHEEL_LORA_R": "4", "FLYWHEEL_LORA_ALPHA": "8",
        "FLYWHEEL_LEARNING_RATE": "0.01", "FLYWHEEL_EVAL_MAX_NEW_TOKENS": "6", "FLYWHEEL_GATE_MIN_EVAL_ITEMS": "2",
        "FLYWHEEL_LEASE_TTL_S": "4", "FLYWHEEL_HEARTBEAT_S": "0.5", "FLYWHEEL_CHECKPOINT_EVERY": "5",
        "FLYWHEEL_EVAL_FRACTION": "0.25", "FLYWHEEL_LOG_LEVEL": "WARNING",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {**os.environ, **values}


def cli(*args, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "flywheel", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_whole_cycle_registers_a_version_with_report(env, sqlite_url, tiny_model_dir, tmp_path):
    p = cli("dataset", "import", str(DATA / "faq.jsonl"), env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "20 new" in out
    p = cli("dataset", "import", str(DATA / "tickets.csv"), env=env)
    assert p.wait(timeout=120) == 0

    outcome = run_cycle(TrainerSettings())
    assert outcome.status == "trained" and outcome.version == "ft-0001"
    with session_scope(get_engine(sqlite_url)) as s:
        assert lease_holder(s, "trainer") is None  # released
        version = list_versions(s)[0]
        run = get_run(s, outcome.run_id)
    assert run.status == "succeeded" and run.progress == 1.0 and run.model_version == "ft-0001"
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4, 5, 6] and all("loss" in m for m in run.metrics)
    assert version.adapter_path == str((tmp_path / "adapters" / "ft-0001").resolve())
    assert verify_adapter(version.adapter_path, expected_sha256=version.adapter_sha256)
    assert version.base_model == base_model_id(os.environ["FLYWHEEL_BASE_MODEL"]) and version.dataset_snapshot_id == run.dataset_snapshot_id
    # A random tiny model learns nothing useful: the gate must say so and reject it.
    assert not version.gate_passed and version.status == "rejected"
    assert any(r.startswith("failed: not better enough") for r in version.gate_reasons)
    report = version.report
    assert set(report["metrics"]) == {"candidate", "base"}
    assert {"token_f1", "exact_match", "rouge_l", "eval_loss", "golden", "labels"} <= set(report["metrics"]["candidate"])
    assert len(report["training"]["loss_history"]) == 6
    png = Path(version.report_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with session_scope(get_engine(sqlite_url)) as s:  # and in the store, for a bot on another machine
        assert report_plot(s, version.name) == png.read_bytes()
    assert json.loads((png.parent / "report.json").read_text())["version"] == "ft-0001"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), version.adapter_path)

    # Nothing new: the next run says so and trains nothing.
    again = run_cycle(TrainerSettings())
    assert again.status == "skipped" and "no new data since run" in again.message

    # With a production version, it is evaluated too (and compared against).
    with session_scope(get_engine(sqlite_url)) as s:
        move_alias(s, "production", "ft-0001", actor="admin", force=True, reason="test")
    forced = run_cycle(TrainerSettings(), force=True)
    assert forced.version == "ft-0002"
    assert set(forced.report["metrics"]) == {"candidate", "production", "base"}
    assert forced.report["production_version"] == "ft-0001"


def test_too_little_data_is_said_clearly(env, sqlite_url):
    p = cli("train", "run", env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "too little data: 0 training item(s)" in out
    with session_scope(get_engine(sqlite_url)) as s:
        assert list_runs(s) == []


def _results(cand_f1, ref_f1, *, lost=(), n_eval=10, cand_loss=2.0, base_loss=2.5, production=True):
    ref = "production" if production else "base"
    res = {"reference": ref, "n_eval": n_eval, "variants": ["candidate", ref],
           "candidate": {"n": n_eval, "token_f1": cand_f1, "eval_loss": cand_loss, "golden_passed": 3, "golden_total": 4},
           ref: {"n": n_eval, "token_f1": ref_f1, "eval_loss": base_loss, "golden_passed": 4, "golden_total": 4},
           "golden_lost": list(lost)}
    res.setdefault("base", {"n": n_eval, "token_f1": 0.1, "eval_loss": base_loss})
    return res


def test_gate_verdicts():
    cfg = TrainerSettings(gate_margin=0.02, gate_min_eval_items=5, gate_golden_tolerance=0)
    passing = gate(_results(0.60, 0.40), cfg, final_train_loss=0.3)
    assert passing.passed and all(r.startswith("passed") for r in passing.reasons)
    assert "recall token F1 0.600 vs 0.400 for production (+0.200" in passing.reasons[1]
    failing = gate(_results(0.41, 0.40), cfg, final_train_loss=0.3)
    assert not failing.passed and failing.reasons[1].startswith("failed: not better enough")
    regressing = gate(_results(0.70, 0.40, lost=[12]), cfg, final_train_loss=0.3)
    assert not regressing.passed
    assert "failed: 1 golden item(s) that production answered right are now wrong (tolerance 0): examples #12" in regressing.reasons
    few = gate(_results(0.9, 0.1, n_eval=3), cfg, final_train_loss=0.3)
    assert not few.passed and few.reasons[0].startswith("failed: only 3 recall items (paraphrases of taught "
                                                         "answers); the gate needs at least 5")
    nan = gate(_results(0.9, 0.1), cfg, final_train_loss=float("nan"))
    assert not nan.passed and "not a finite number" in nan.reasons[-1]
    blown = gate(_results(0.9, 0.1, cand_loss=9.0, base_loss=2.0, production=False), cfg, final_train_loss=0.1)
    assert not blown.passed and "over 1.5x the base" in blown.reasons[-1] and "the base model (nothing in production)" in blown.reasons[1]


def test_gate_refuses_harm_to_general_never_taught_and_memory_answers():
    """Recall is not enough: general questions (against the base model), never-taught ones and
    answers with the memory (against production) may each lose at most the tolerance."""
    cfg = TrainerSettings(gate_margin=0.02, gate_min_eval_items=5, gate_regression_tolerance=0.05)

    def results(slices=None):
        res = _results(0.8, 0.4)
        res["memory"] = True
        for variant in ("candidate", "production", "base"):
            for name in ("recall_memory", "never_taught", "never_taught_memory", "general", "general_memory"):
                res[variant][name] = {"n": 4, "token_f1": 0.7}
        for (variant, name), f1 in (slices or {}).items():
            res[variant][name]["token_f1"] = f1
        return res

    fine = gate(results(), cfg, final_train_loss=0.3)
    assert fine.passed, fine.reasons
    assert "passed: general questions with the memory: token F1 0.700 vs 0.700 for the base model" in " ".join(fine.reasons)
    for variant_slice, words in (
            (("candidate", "general"), "failed: worse on general questions: token F1 0.500 vs 0.700 for the base model"),
            (("candidate", "general_memory"), "failed: worse on general questions with the memory"),
            (("candidate", "never_taught"), "failed: worse on never-taught questions: token F1 0.500 vs 0.700 for production"),
            (("candidate", "recall_memory"), "failed: worse on recall with the memory")):
        verdict = gate(results({variant_slice: 0.5}), cfg, final_train_loss=0.3)
        assert not verdict.passed and any(r.startswith(words) for r in verdict.reasons), verdict.reasons
    # within the tolerance is not a regression
    assert gate(results({("candidate", "general"): 0.66}), cfg, final_train_loss=0.3).passed
    # one or two never-taught answers worded differently do not decide a verdict
    few = results({("candidate", "never_taught"): 0.2})
    few["n"] = {"never_taught": 1, "general": 8}
    verdict = gate(few, cfg, final_train_loss=0.3)
    assert verdict.passed and any(r.startswith("not checked: only 1 never-taught questions") for r in verdict.reasons)


def _wait_for(predicate, timeout, what):
    return wait_until(predicate, timeout, what, interval=0.2)


def test_killed_run_registers_nothing_and_the_next_run_resumes(env, sqlite_url):
    with session_scope(get_engine(sqlite_url)) as s:
        from trainer.importer import import_file

        import_file(s, DATA / "faq.jsonl")
    env = {**env, "FLYWHEEL_MAX_STEPS": "70", "FLYWHEEL_BATCH_SIZE": "2"}
    proc = cli("train", "run", env=env)
    try:
        def progressed():
            with session_scope(get_engine(sqlite_url)) as s:
                runs = list_runs(s)
                return runs[0] if runs and runs[0].step >= 12 else None
        run = _wait_for(progressed, 180, "the run to pass step 12")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with session_scope(get_engine(sqlite_url)) as s:
        assert get_run(s, run.id).status == "running"  # nobody told the store: it died
        assert list_versions(s) == []
    with session_scope(get_engine(sqlite_url)) as s:
        assert lease_holder(s, "trainer") is not None  # still held until it expires
    settings = TrainerSettings(max_steps=70, batch_size=2)
    with pytest.raises(LeaseBusy, match="another training run is in progress"):
        run_cycle(settings)
    _wait_for(lambda: _lease_free(sqlite_url), 10, "the dead trainer's lease to expire")
    outcome = run_cycle(settings)
    assert outcome.status == "trained" and outcome.version == "ft-0001"
    assert outcome.report["training"]["resumed_from"] >= 10
    with session_scope(get_engine(sqlite_url)) as s:
        dead = get_run(s, run.id)
        assert dead.status == "failed" and "stopped heartbeating" in dead.error and dead.model_version is None
        assert [v.name for v in list_versions(s)] == ["ft-0001"]


def _lease_free(url):
    with session_scope(get_engine(url)) as s:
        return lease_holder(s, "trainer") is None


def test_two_trainers_at_once_one_runs(env, sqlite_url):
    with session_scope(get_engine(sqlite_url)) as s:
        from trainer.importer import import_file

        import_file(s, DATA / "faq.jsonl")
    env = {**env, "FLYWHEEL_MAX_STEPS": "60", "FLYWHEEL_BATCH_SIZE": "2"}
    procs = [cli("train", "run", env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    busy = next(err for code, _, err in results if code == 3)
    assert "another training run is in progress" in busy
    with session_scope(get_engine(sqlite_url)) as s:
        assert [v.name for v in list_versions(s)] == ["ft-0001"]
        assert [r.status for r in list_runs(s)] == ["succeeded"]


@pytest.mark.parametrize("objective, key", [("sft+dpo", "dpo"), ("kto", "kto")])
def test_a_preference_cycle_trains_on_what_people_voted_down(objective, key, tmp_path, sqlite_url, tiny_model_dir,
                                                             monkeypatch):
    """The cycle hands the objective its items from the snapshot: DPO the (taught, voted-down)
    pairs, KTO also the 👎 nobody corrected; each step's history carries the preference loss."""
    from store.examples import upsert_example
    from tests.support.trainer_env import import_facts, tiny_trainer_env

    tiny_trainer_env(monkeypatch, database_url=sqlite_url, model_dir=tiny_model_dir, work=tmp_path,
                     FLYWHEEL_OBJECTIVE=objective, FLYWHEEL_GATE_MIN_EVAL_ITEMS="1")
    import_facts(sqlite_url)
    with session_scope(get_engine(sqlite_url)) as s:
        upsert_example(s, messages=[{"role": "user", "content": "Who runs payroll?"}], answer="Aino runs payroll.",
                       rejected_answer="The CEO runs payroll.", source="correction")
        upsert_example(s, messages=[{"role": "user", "content": "Is the office open on Sunday?"}],
                       rejected_answer="Yes, every Sunday.", source="rejected")
    outcome = run_cycle(TrainerSettings())
    assert outcome.status == "trained", outcome
    with session_scope(get_engine(sqlite_url)) as s:
        run = get_run(s, outcome.run_id)
    assert run.metrics and all(key in m for m in run.metrics), run.metrics
