"""The whole loop through the real components, shortened: signed Slack events into the real bot,
answers from the real gateway (tiny model), feedback into the store, a real LoRA training run,
the gate, an admin's promotion over Slack, the gateway's hot-swap, and a changed answer out."""
from __future__ import annotations

import json

from flywheel.app.demo.week import DemoConfig, run_demo
from flywheel.modelfiles import build_tiny_llama
from flywheel.redact import redact
from store.db import session_scope
from store.feedback import count_feedback
from store.versions import alias_history


def test_shortened_demo_closes_the_loop(base_model_dir, tmp_path, monkeypatch):
    # Untied embeddings: a tied random model's greedy answers are blank, and blank is not an answer.
    model = build_tiny_llama(tmp_path / "tiny-untied", base_model_dir, tie_embeddings=False)
    out = tmp_path / "demo"
    trainer_env = {
        "FLYWHEEL_EPOCHS": "40", "FLYWHEEL_LEARNING_RATE": "5e-3", "FLYWHEEL_WARMUP_RATIO": "0",
        "FLYWHEEL_EVAL_FRACTION": "0.34", "FLYWHEEL_GATE_MIN_EVAL_ITEMS": "1", "FLYWHEEL_MIN_TRAIN_EXAMPLES": "2",
        "FLYWHEEL_GATE_MAX_LOSS_RATIO": "3.0",
        # One unseen eval item tells a random model nothing: the margin is the gate tests' business.
        "FLYWHEEL_GATE_MARGIN": "-0.05",
    }
    lines: list[str] = []
    result = run_demo(DemoConfig(output=out, model_dir=model, facts=6, paraphrases=1, max_tokens=24,
                                 trainer_env=trainer_env, quiet_slack=True), say=lines.append)

    version = result["version"]
    assert version["gate_passed"], version["gate_reasons"]
    assert result["refused_by_slack"] == []  # every message, modal and view was valid Block Kit
    rows = result["rows"]
    asked = [r for r in rows if r.kind == "asked"]
    corrected = [r for r in asked if r.feedback.startswith("👎")]
    assert corrected, "the scripted team corrected nothing"
    # Right after the corrections, before any training, the memory answers them as taught, with
    # secrets redacted as in training data ("The guest Wi-Fi password is [SECRET].").
    assert all(r.memory == redact(r.truth) and r.memory_version == "memory" for r in corrected)
    # After the promotion the bot answers from the promoted version or, for taught questions, the memory.
    assert all(r.after_version in (version["name"], "memory") for r in rows)
    assert any(r.after_version == version["name"] for r in rows)
    assert sum(r.after != r.before for r in asked) >= len(asked) // 2
    # The adapter alone (memory off) learned the corrections too: it says them more closely.
    assert sum(r.lora_only_f1 for r in corrected) > sum(r.before_f1 for r in corrected)

    # What the store saw: feedback of every kind the script used, and one audited promotion.
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", f"sqlite:///{out / 'flywheel.db'}")
    with session_scope() as session:
        counts = count_feedback(session)
        history = alias_history(session)
    assert counts.get("correction:correction", 0) == len(corrected)
    assert [(h["from"], h["to"], h["actor"]) for h in history] == [(None, version["name"], "UADMIN01")]

    # Outputs a person reads: the table, the results, the report and its plot.
    assert (out / "before_after.md").read_text().count("\n") >= len(rows) + 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["version"]["name"] == version["name"]
    phases = {"before_f1", "memory_f1", "after_f1", "lora_only_f1"}
    assert all(phases <= set(saved["summary"][kind]) for kind in ("asked", "paraphrase"))
    assert all({"before", "memory", "after", "lora_only"} <= set(row) for row in saved["rows"])
    assert (out / "report.png").stat().st_size > 1000
