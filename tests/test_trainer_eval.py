"""Evaluation metrics, label parsing, the watch schedule and the dataset export command."""
from __future__ import annotations

from pathlib import Path

import pytest

from trainer.metrics import (
    answer_metrics,
    exact_match,
    label_metrics,
    parse_label,
    rouge_l,
    token_f1,
)

DATA = Path(__file__).parent / "data"


def test_squad_style_metrics():
    assert exact_match("The Heron X4.", "heron x4") == 1.0
    assert token_f1("It costs 90 euros", "Loom Console costs 90 euros per robot") == pytest.approx(2 * (3 / 4) * (3 / 7) / (3 / 4 + 3 / 7))
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("cat", "dog") == 0.0
    assert rouge_l("x b c d", "x c d e") == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    m = answer_metrics(["Paris", "Rome"], ["Paris", "Berlin"])
    assert m == {"n": 2, "token_f1": 0.5, "exact_match": 0.5, "rouge_l": 0.5}


def test_label_parsing_and_metrics():
    labels = ["billing", "bug", "feature"]
    assert parse_label("Bug.", labels) == "bug"
    assert parse_label("I think this is a feature request", labels) == "feature"
    assert parse_label("no idea", labels) is None
    m = label_metrics(["bug", "bug", "billing", None], ["bug", "billing", "billing", "feature"], labels)
    assert m["accuracy"] == 0.5
    assert m["per_label"]["bug"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1}
    assert m["per_label"]["billing"]["recall"] == 0.5 and m["per_label"]["feature"]["f1"] == 0.0


def test_watch_due_rules(session, tmp_path):
    from store.examples import upsert_example
    from store.runs import finish_run, queue_run, start_run
    from trainer.settings import TrainerSettings
    from trainer.watch import due

    cfg = TrainerSettings(watch_min_new=3, watch_cooldown_s=3600)
    assert due(session, cfg) == (False, "0 new examples and votes, waiting for 3")
    for i in range(3):
        upsert_example(session, messages=[{"role": "user", "content": f"q{i}"}], answer="a", source="import")
    assert due(session, cfg) == (True, "3 new examples and votes since the last run")
    run = start_run(session, owner="t", hyperparams={})
    finish_run(session, run.id, "succeeded")
    go, why = due(session, cfg)
    assert not go and why.startswith("cooling down for")
    assert due(session, TrainerSettings(watch_min_new=3, watch_cooldown_s=0))[0] is False  # nothing newer
    queue_run(session, queued_by="U_ADMIN")
    assert due(session, cfg) == (True, "a run was queued")


def test_watch_once_runs_a_due_cycle_and_export(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flywheel.app.cli import app

    for k, v in {"FLYWHEEL_BASE_MODEL": str(tiny_model_dir), "FLYWHEEL_ADAPTERS_DIR": str(tmp_path / "ad"),
                 "FLYWHEEL_RUNS_DIR": str(tmp_path / "runs"), "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
                 "FLYWHEEL_MAX_STEPS": "2", "FLYWHEEL_EVAL_MAX_NEW_TOKENS": "4", "FLYWHEEL_WATCH_MIN_NEW": "5",
                 "FLYWHEEL_LORA_R": "2"}.items():
        monkeypatch.setenv(k, v)
    runner = CliRunner()
    res = runner.invoke(app, ["train", "watch", "--once"])
    assert res.exit_code == 0 and "after 0 cycle(s)" in res.output
    assert runner.invoke(app, ["dataset", "import", str(DATA / "faq.jsonl")]).exit_code == 0
    res = runner.invoke(app, ["dataset", "export", str(tmp_path / "none")])
    assert res.exit_code == 2 and "no snapshot yet" in res.output
    res = runner.invoke(app, ["train", "watch", "--once"])
    assert res.exit_code == 0 and "after 1 cycle(s)" in res.output, res.output
    from store.db import get_engine, session_scope
    from store.versions import list_versions

    with session_scope(get_engine(sqlite_url)) as s:
        assert [v.name for v in list_versions(s)] == ["ft-0001"]
    res = runner.invoke(app, ["dataset", "export", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "eval.jsonl", "general.jsonl", "golden.jsonl", "hf", "manifest.json", "recall.jsonl", "rejected.jsonl",
        "train.jsonl"]
    res = runner.invoke(app, ["dataset", "export", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not empty" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nhello,\n")
    res = runner.invoke(app, ["dataset", "import", str(bad)])
    assert res.exit_code == 2 and "line 2: needs 'question' and 'answer'" in res.output
