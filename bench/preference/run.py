"""SFT alone against SFT + DPO (and KTO) on the same team's data: the store a finished demo week
left behind (corrections with the answers they replaced), the same snapshot, seed and schedule;
only FLYWHEEL_OBJECTIVE differs. Reported per objective, for the candidate adapter alone (no
memory) on the held-out pairs (taught facts asked in other words, with the answer people voted
down): the share of pairs preferring the taught answer, the mean log-prob margin, how often the
generated answer repeats the rejected one, and the recall token F1.

    .venv/bin/python bench/preference/run.py [--db bench/learning/out/bundled-default/flywheel.db]
                                             [--objectives sft sft+dpo kto] [--quick]

`--quick` trains 20 steps per objective. The last line is `RESULT {json}`."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def run(db: Path, objective: str, work: Path, quick: bool) -> dict:
    import torch

    from store.db import get_engine, session_scope
    from trainer.dataset import build_snapshot
    from trainer.encode import encode_rows
    from trainer.evaluate import eval_memory, evaluate
    from trainer.modeling import add_lora, load_base_model, load_tokenizer
    from trainer.notes import noted_rows
    from trainer.preference import preference_items
    from trainer.settings import TrainerSettings
    from trainer.train import train_lora

    settings = TrainerSettings(objective=objective, data_dir=work / "data", runs_dir=work / "runs",
                               adapters_dir=work / "adapters", augment=False,
                               **({"max_steps": 20} if quick else {}))
    with session_scope(get_engine(f"sqlite:///{db}")) as s:
        snap = build_snapshot(s, settings, derive=False)
    torch.manual_seed(settings.seed)
    cpu = torch.device("cpu")
    tok = load_tokenizer(settings.base_model)
    model = add_lora(load_base_model(settings.base_model, cpu), settings)
    train_rows = list(snap.dataset["train"])
    memory = eval_memory(train_rows, settings)
    encoded, _ = encode_rows(tok, train_rows + noted_rows(train_rows, memory), settings.max_length)
    pairs = preference_items(objective, tok, snap.dataset, settings.max_length)
    started = time.perf_counter()
    result = train_lora(model, encoded, settings, device=cpu, bf16=False, pad_id=tok.pad_token_id, progress=False,
                        n_facts=sum(1 for r in train_rows if not r["augmented"]), pairs=pairs)
    seconds = time.perf_counter() - started
    ds = snap.dataset
    splits = {"recall": list(ds["recall"]), "never_taught": list(ds["eval"]), "general": list(ds["general"]),
              "golden": list(ds["golden"])}
    results = evaluate(model, tok, splits, snap.counts.get("labels", []), settings, device=cpu, memory=memory)
    cand, base = results["candidate"], results["base"]
    return {"objective": objective, "train_pairs": len(pairs or []), "steps": len(result.history),
            "train_seconds": round(seconds, 1), "recall_f1": cand["recall"].get("token_f1"),
            "recall_memory_f1": cand["recall_memory"].get("token_f1"), "general_f1": cand["general"].get("token_f1"),
            "preferences": cand["preferences"], "base_preferences": base["preferences"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", type=Path, default=ROOT / "bench/learning/out/bundled-default/flywheel.db")
    ap.add_argument("--objectives", nargs="+", default=["sft", "sft+dpo"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not args.db.is_file():
        sys.exit(f"no store at {args.db}: run `bench/learning/run.py --sets bundled` (or `make demo`) first")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for objective in args.objectives:
            work = Path(tmp) / objective.replace("+", "_")
            db = work / "flywheel.db"
            work.mkdir(parents=True)
            shutil.copy(args.db, db)  # the snapshot records itself in the store: never touch the original
            row = run(db, objective, work, args.quick)
            rows.append(row)
            p = row["preferences"] or {}
            print(f"{objective:8s} pairs {row['train_pairs']:3d} | recall F1 {row['recall_f1']} | "
                  f"held-out pairs preferring the taught answer {p.get('positive_share')} "
                  f"(margin {p.get('mean_margin')}) | repeats rejected {p.get('repeat_share')} | "
                  f"{row['train_seconds']} s", flush=True)
    print("RESULT " + json.dumps(rows))


if __name__ == "__main__":
    main()
