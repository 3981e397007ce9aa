"""The schedule on a fact set of any size, without Slack: the facts are imported as curated
answers into a fresh SQLite store, one training cycle runs with the trainer's defaults (steps
from the data size, early stop), and the run's numbers are printed: steps planned and run, time,
final loss, recall (held-out rule phrasings) and general-question F1 for candidate and base, the
gate. Use it for sets too large for the demo's week on a CPU (bench/learning/facts/logistics_200).

    .venv/bin/python bench/learning/schedule.py FACTS.jsonl [--out DIR]

The last line is `RESULT {json}`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("facts", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = (args.out or ROOT / "bench" / "learning" / "out" / f"schedule-{args.facts.stem}").resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "FLYWHEEL_DATABASE_URL": f"sqlite:///{out / 'flywheel.db'}",
           "FLYWHEEL_ADAPTERS_DIR": str(out / "adapters"), "FLYWHEEL_RUNS_DIR": str(out / "runs"),
           "FLYWHEEL_DATA_DIR": str(out / "data"), "FLYWHEEL_MAX_NEW_TOKENS": "40", "HF_HUB_OFFLINE": "1"}
    flywheel = str(ROOT / ".venv" / "bin" / "flywheel")
    for cmd in (["db", "upgrade"], ["dataset", "import", str(args.facts.resolve())]):
        subprocess.run([flywheel, *cmd], cwd=ROOT, env=env, check=True)
    started = time.monotonic()
    subprocess.run([flywheel, "train", "run"], cwd=ROOT, env=env, check=True)
    seconds = time.monotonic() - started
    report = json.loads(next((out / "runs").glob("run-*/report.json")).read_text())
    t, m = report["training"], report["metrics"]
    result = {"facts": args.facts.stem, "train_items": report["dataset"]["counts"]["train"],
              "planned_steps": t["steps"], "stopped_early_at": t["stopped_early_at"],
              "final_loss": t["final_loss"], "train_seconds": t["seconds"], "cycle_seconds": round(seconds, 1),
              "peak_learning_rate": max((h["lr"] for h in t["loss_history"]), default=None),
              "recall_f1": {v: m[v].get("recall_f1") for v in m}, "general_f1": {v: m[v].get("general_f1") for v in m},
              "gate_passed": report["gate"]["passed"], "gate": report["gate"]["reasons"]}
    print(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
