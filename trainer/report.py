"""The run report: a JSON document (for the store and the bot) and a PNG with the loss curve
and the metric comparison (for Slack)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METRICS = ("token_f1", "exact_match", "rouge_l")
# What users see, per slice, without and with the correction memory (token F1).
SLICE_COLUMNS = {"recall": "recall_f1", "recall_memory": "recall_memory_f1", "never_taught": "never_taught_f1",
                 "never_taught_memory": "never_taught_memory_f1", "general": "general_f1",
                 "general_memory": "general_memory_f1"}
PLOTTED = (("recall_f1", "recall"), ("recall_memory_f1", "recall\n+memory"), ("golden_rate", "golden"),
           ("never_taught_f1", "never\ntaught"), ("general_f1", "general"), ("general_memory_f1", "general\n+memory"),
           ("pairs_preferred", "pairs:\ntaught >\nrejected"), ("repeat_share", "repeats\nrejected"))


def metrics_table(results: dict) -> dict:
    """{variant: {token_f1 (recall), exact_match, rouge_l, <slice>_f1…, eval_loss, perplexity, golden, labels?}}."""
    table = {}
    for name in results["variants"]:
        m = results[name]
        row = {k: _round(m.get(k)) for k in (*METRICS, "eval_loss", "perplexity")}
        for sl, column in SLICE_COLUMNS.items():
            if isinstance(m.get(sl), dict) and m[sl].get("n"):
                row[column] = _round(m[sl].get("token_f1"))
        row["golden"] = f"{m.get('golden_passed', 0)}/{m.get('golden_total', 0)}"
        if m.get("golden_total"):
            row["golden_rate"] = _round(m["golden_passed"] / m["golden_total"])
        if "labels" in m:
            row["labels"] = {k: _round(m["labels"][k]) for k in ("accuracy", "precision", "recall", "f1")}
        prefs = m.get("preferences")
        if prefs:  # held-out (taught, voted-down) pairs: share preferring the taught one, margin, repeats
            row.update(pairs_preferred=prefs["positive_share"], pair_margin=prefs["mean_margin"],
                       repeat_share=prefs["repeat_share"], pairs=prefs["pairs"])
        table[name] = row
    return table


def _round(x):
    return round(x, 4) if isinstance(x, float) else x


def build_report(*, version: str, run_id: int, snapshot, results: dict, verdict, train, hyperparams: dict,
                 base_model: str) -> dict:
    return {
        "version": version, "run_id": run_id, "base_model": base_model,
        "dataset": {"snapshot_id": snapshot.id, "content_hash": snapshot.content_hash, "counts": snapshot.counts},
        "metrics": metrics_table(results),
        "reference": results["reference"], "production_version": results.get("production_version"),
        "golden": results.get("golden", []), "golden_lost": results.get("golden_lost", []),
        "samples": results.get("samples", []),
        "gate": {"passed": verdict.passed, "reasons": verdict.reasons},
        "training": {"steps": train.steps, "stopped_early_at": train.stopped_early_at, "resumed_from": train.resumed_from, "seconds": round(train.seconds, 2),
                     "tokens": train.tokens, "target_tokens": train.target_tokens,
                     "tokens_per_s": round(train.tokens_per_s, 1), "padding_waste": round(train.padding_waste, 4),
                     "final_loss": _round(train.final_loss), "loss_history": train.history},
        "hyperparams": hyperparams,
    }


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    """report.json and report.png side by side; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "report.json", out_dir / "report.png"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    fig, (ax_loss, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    hist = report["training"]["loss_history"]
    ax_loss.plot([h["step"] for h in hist], [h["loss"] for h in hist], color="#1f77b4")
    ax_loss.set_title("training loss (answer tokens)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    table = report["metrics"]
    names = list(table)
    shown = [(k, label) for k, label in PLOTTED if any(table[n].get(k) is not None for n in names)]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [table[name].get(k) or 0.0 for k, _ in shown]
        bars = ax_bar.bar([j + i * width for j in range(len(shown))], values, width, label=name)
        ax_bar.bar_label(bars, fmt="%.2f", fontsize=7)
    ax_bar.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(shown))], [lab for _, lab in shown])
    ax_bar.set_ylabel("token F1 (golden, pairs, repeats: shares)")
    ax_bar.set_ylim(0, 1.1)
    ax_bar.legend()
    verdict = "gate passed" if report["gate"]["passed"] else "gate failed"
    ax_bar.set_title(f"{report['version']}: {verdict}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path
