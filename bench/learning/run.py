"""Learning that holds, measured as users see it: the demo's week (real bot, gateway, trainer)
on several fact sets, optionally with trainer settings varied (an ablation), one row per run.

    .venv/bin/python bench/learning/run.py [--sets bundled team_10 ...] [--variant NAME:K=V,K=V ...]
                                           [--paraphrases 2] [--recheck N] [--quick]

Each run writes demo-output-like files under bench/learning/out/<set>-<variant>/; the table has
summary[kind][phase] token F1 (phases: before = base, memory = corrections in the memory and no
retrain, after = promoted adapter + memory, lora_only = adapter alone), the gate verdict and the
time. `--quick` plays team_10 only. The last line is `RESULT {json}`."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FACTS = ROOT / "bench" / "learning" / "facts"


def fact_file(name: str) -> Path | None:
    return None if name == "bundled" else FACTS / f"{name}.jsonl"


def run_one(name: str, variant: str, env_overrides: dict, paraphrases: int, recheck: int = 0) -> dict:
    out = ROOT / "bench" / "learning" / "out" / f"{name}-{variant}"
    cmd = [str(ROOT / ".venv" / "bin" / "flywheel"), "demo", "run", "--output", str(out),
           "--paraphrases", str(paraphrases), "--recheck", str(recheck)]
    if fact_file(name) is not None:
        cmd += ["--facts-file", str(fact_file(name))]
    started = time.monotonic()
    log = out.parent / f"{name}-{variant}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **env_overrides}, stdout=fh, stderr=subprocess.STDOUT)
    row = {"set": name, "variant": variant, "env": env_overrides, "rc": rc,
           "seconds": round(time.monotonic() - started, 1), "log": str(log.relative_to(ROOT))}
    if rc == 0:
        res = json.loads((out / "results.json").read_text())
        row["summary"] = res["summary"]
        row["gate_passed"] = res["version"]["gate_passed"]
        row["gate_reasons"] = res["version"]["gate_reasons"]
        row["timings_s"] = res["timings_s"]
    else:
        row["error"] = log.read_text()[-800:]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="+", default=["bundled", "team_10", "clinic_30", "studio_45"])
    ap.add_argument("--variant", nargs="+", default=["default:"],
                    help="NAME:KEY=VAL,KEY=VAL (trainer/bot environment), e.g. none:FLYWHEEL_AUGMENT_TEMPLATES=0")
    ap.add_argument("--paraphrases", type=int, default=2)
    ap.add_argument("--recheck", type=int, default=0,
                    help="ask only N sampled facts through the bot again after the week (0: all)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    sets = ["team_10"] if args.quick else args.sets
    rows = []
    for spec in args.variant:
        vname, _, pairs = spec.partition(":")
        env = dict(p.split("=", 1) for p in pairs.split(",") if p)
        for name in sets:
            row = run_one(name, vname, env, args.paraphrases, args.recheck)
            rows.append(row)
            s = row.get("summary")
            if s:
                print(f"{name:10} {vname:10} asked {s['asked']['before_f1']}→mem {s['asked']['memory_f1']}→"
                      f"after {s['asked']['after_f1']} (lora {s['asked']['lora_only_f1']}) | paraphrase "
                      f"{s['paraphrase']['before_f1']}→mem {s['paraphrase']['memory_f1']}→after "
                      f"{s['paraphrase']['after_f1']} (lora {s['paraphrase']['lora_only_f1']}) | general "
                      f"{s['general']['before_f1']}→{s['general']['after_f1']} | gate "
                      f"{'passed' if row['gate_passed'] else 'failed'} | {row['seconds']:.0f} s", flush=True)
            else:
                print(f"{name:10} {vname:10} FAILED rc={row['rc']} (see {row['log']})", flush=True)
    print("RESULT " + json.dumps(rows, ensure_ascii=False))


if __name__ == "__main__":
    main()
