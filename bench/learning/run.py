"""Learning that holds, measured as users see it: the demo's week (real bot, gateway, trainer)
on several fact sets, optionally with trainer settings varied (an ablation), one row per run.

    .venv/bin/python bench/learning/run.py [--sets bundled team_10 ...] [--variant NAME:K=V,K=V ...]
                                           [--paraphrases 2] [--recheck N] [--quick]
                                           [--docs DIR [--until docs]]

Each run writes demo-output-like files under bench/learning/out/<set>-<variant>/; the table has
summary[kind][phase] token F1 (phases: before = base, docs = after importing `--docs DIR`, before
any correction, memory = corrections in the memory and no retrain, after = promoted adapter +
memory, lora_only = adapter alone), the gate verdict and the time. `--docs` imports a handbook
first (bench/learning/docs/quillstone states team_10's facts as prose, among unrelated sections);
`--until docs` stops each run after the docs phase. `--quick` plays team_10 only. The last line
is `RESULT {json}`."""
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


def run_one(name: str, variant: str, env_overrides: dict, paraphrases: int, recheck: int = 0,
            docs: Path | None = None, until: str | None = None) -> dict:
    out = ROOT / "bench" / "learning" / "out" / f"{name}-{variant}"
    cmd = [str(ROOT / ".venv" / "bin" / "flywheel"), "demo", "run", "--output", str(out),
           "--paraphrases", str(paraphrases), "--recheck", str(recheck)]
    if fact_file(name) is not None:
        cmd += ["--facts-file", str(fact_file(name))]
    if docs is not None:
        cmd += ["--docs", str(docs.resolve())]
    if until is not None:
        cmd += ["--until", until]
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
        version = res["version"] or {}  # None: the run stopped before training (--until docs)
        row["gate_passed"] = version.get("gate_passed")
        row["gate_reasons"] = version.get("gate_reasons")
        row["timings_s"] = res["timings_s"]
    else:
        row["error"] = log.read_text()[-800:]
    return row


def line(name: str, variant: str, row: dict) -> str:
    """One run as a line: each kind's F1 by phase (the phases that ran), the gate, the time."""
    s = row["summary"]

    def chain(kind: str) -> str:
        m = s[kind]
        out = " → ".join(f"{label} {m[phase + '_f1']}" for phase, label in
                         (("before", "base"), ("docs", "docs"), ("memory", "mem"), ("after", "after"))
                         if m[phase + "_f1"] is not None)
        out += f" (lora {m['lora_only_f1']})" if m["lora_only_f1"] is not None else ""
        return out + (f" cited ok {m['docs_cite_ok']}" if m.get("docs_cite_ok") is not None else "")

    gate = {True: "passed", False: "failed", None: "not trained"}[row["gate_passed"]]
    return (f"{name:10} {variant:10} asked {chain('asked')} | paraphrase {chain('paraphrase')} | "
            f"general {chain('general')} | gate {gate} | {row['seconds']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sets", nargs="+", default=["bundled", "team_10", "clinic_30", "studio_45"])
    ap.add_argument("--variant", nargs="+", default=["default:"],
                    help="NAME:KEY=VAL,KEY=VAL (trainer/bot environment), e.g. none:FLYWHEEL_AUGMENT_TEMPLATES=0")
    ap.add_argument("--paraphrases", type=int, default=2)
    ap.add_argument("--recheck", type=int, default=0,
                    help="ask only N sampled facts through the bot again after the week (0: all)")
    ap.add_argument("--docs", type=Path, default=None,
                    help="import these documents before the week (the docs phase), e.g. bench/learning/docs/quillstone")
    ap.add_argument("--until", choices=["docs"], default=None, help="docs: stop after the docs phase")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.until and args.docs is None:
        ap.error("--until docs needs --docs DIR")
    sets = ["team_10"] if args.quick else args.sets
    rows = []
    for spec in args.variant:
        vname, _, pairs = spec.partition(":")
        env = dict(p.split("=", 1) for p in pairs.split(",") if p)
        for name in sets:
            row = run_one(name, vname, env, args.paraphrases, args.recheck, args.docs, args.until)
            rows.append(row)
            if row.get("summary"):
                print(line(name, vname, row), flush=True)
            else:
                print(f"{name:10} {vname:10} FAILED rc={row['rc']} (see {row['log']})", flush=True)
    print("RESULT " + json.dumps(rows, ensure_ascii=False))


if __name__ == "__main__":
    main()
