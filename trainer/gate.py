"""The evaluation gate: may this candidate be offered to an admin? Every check says in plain
words what it found, pass or fail, so the verdict explains itself in Slack."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainer.evaluate import CANDIDATE, primary_metric


@dataclass
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)


def gate(results: dict, settings, *, final_train_loss: float | None) -> Verdict:
    reasons, ok = [], True
    reference = results["reference"]
    ref_label = "production" if reference == "production" else "the base model (nothing in production)"
    n_eval = results["n_eval"]
    if n_eval < settings.gate_min_eval_items:
        ok = False
        reasons.append(f"failed: only {n_eval} eval items; the gate needs at least {settings.gate_min_eval_items}")
    else:
        reasons.append(f"passed: {n_eval} eval items (at least {settings.gate_min_eval_items} needed)")
    name, cand = primary_metric(results[CANDIDATE])
    _, ref = primary_metric(results[reference])
    if cand is None or ref is None:
        ok = False
        reasons.append(f"failed: no {name} could be computed (no eval items)")
    else:
        delta = cand - ref
        words = f"{name} {cand:.3f} vs {ref:.3f} for {ref_label} ({delta:+.3f}; margin {settings.gate_margin:+.3f})"
        if delta >= settings.gate_margin:
            reasons.append(f"passed: {words}")
        else:
            ok = False
            reasons.append(f"failed: not better enough: {words}")
    lost = results.get("golden_lost", [])
    total = results[CANDIDATE].get("golden_total", 0)
    if len(lost) > settings.gate_golden_tolerance:
        ok = False
        shown = "; ".join(f'"{q[:60]}"' for q in lost[:3])
        reasons.append(f"failed: {len(lost)} golden item(s) that {ref_label} answered right are now wrong "
                       f"(tolerance {settings.gate_golden_tolerance}): {shown}")
    else:
        reasons.append(f"passed: golden set {results[CANDIDATE].get('golden_passed', 0)}/{total} right, "
                       f"{len(lost)} regression(s) (tolerance {settings.gate_golden_tolerance})")
    cand_loss = results[CANDIDATE].get("eval_loss")
    base_loss = results["base"].get("eval_loss")
    if final_train_loss is None or not math.isfinite(final_train_loss):
        ok = False
        reasons.append(f"failed: training loss is not a finite number ({final_train_loss})")
    elif cand_loss is not None and (not math.isfinite(cand_loss) or
                                    (base_loss and cand_loss > settings.gate_max_loss_ratio * base_loss)):
        ok = False
        reasons.append(f"failed: eval loss {cand_loss:.3f} is over {settings.gate_max_loss_ratio}x the base "
                       f"model's {base_loss:.3f}")
    else:
        shown = f"{cand_loss:.3f}" if cand_loss is not None else "n/a"
        base = f"{base_loss:.3f}" if base_loss is not None else "n/a"
        reasons.append(f"passed: losses sane (train {final_train_loss:.3f}, eval {shown}, base eval {base})")
    return Verdict(ok, reasons)
