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


def _f1(metrics: dict, slice_name: str) -> float | None:
    return (metrics.get(slice_name) or {}).get("token_f1")


def _no_worse(reasons: list[str], what: str, cand: float | None, ref: float | None, ref_label: str,
              tolerance: float) -> bool:
    """One harm check: the candidate may lose at most `tolerance` token F1 against the reference."""
    if cand is None or ref is None:
        return True
    words = f"{what}: token F1 {cand:.3f} vs {ref:.3f} for {ref_label} (tolerance {tolerance:.2f})"
    if cand >= ref - tolerance:
        reasons.append(f"passed: {words}")
        return True
    reasons.append(f"failed: worse on {words}")
    return False


def gate(results: dict, settings, *, final_train_loss: float | None) -> Verdict:
    """Recall decides (the candidate must know the taught facts better, asked in new words);
    golden items, never-taught items and general questions may not get worse, without or with
    the memory; losses must be sane."""
    reasons, ok = [], True
    reference = results["reference"]
    ref_label = "production" if reference == "production" else "the base model (nothing in production)"
    cand_m, ref_m, base_m = results[CANDIDATE], results[reference], results["base"]
    n_eval = results["n_eval"]
    if n_eval < settings.gate_min_eval_items:
        ok = False
        reasons.append(f"failed: only {n_eval} recall items (paraphrases of taught answers); the gate needs at "
                       f"least {settings.gate_min_eval_items}: teach a few more answers")
    else:
        reasons.append(f"passed: {n_eval} recall items (at least {settings.gate_min_eval_items} needed)")
    name, cand = primary_metric(cand_m)
    _, ref = primary_metric(ref_m)
    if cand is None or ref is None:
        ok = False
        reasons.append(f"failed: no {name} could be computed (nothing taught to recall)")
    else:
        delta = cand - ref
        words = f"{name} {cand:.3f} vs {ref:.3f} for {ref_label} ({delta:+.3f}; margin {settings.gate_margin:+.3f})"
        if delta >= settings.gate_margin:
            reasons.append(f"passed: {words}")
        else:
            ok = False
            reasons.append(f"failed: not better enough: {words}")
    tol = settings.gate_regression_tolerance
    if results.get("memory"):
        ok &= _no_worse(reasons, "recall with the memory", _f1(cand_m, "recall_memory"),
                        _f1(ref_m, "recall_memory"), ref_label, tol)
    lost = results.get("golden_lost", [])
    total = cand_m.get("golden_total", 0)
    if len(lost) > settings.gate_golden_tolerance:
        ok = False
        shown = ", ".join(f"#{example_id}" for example_id in lost[:10]) + (", …" if len(lost) > 10 else "")
        reasons.append(f"failed: {len(lost)} golden item(s) that {ref_label} answered right are now wrong "
                       f"(tolerance {settings.gate_golden_tolerance}): examples {shown}")
    else:
        reasons.append(f"passed: golden set {cand_m.get('golden_passed', 0)}/{total} right, "
                       f"{len(lost)} regression(s) (tolerance {settings.gate_golden_tolerance})")
    n = results.get("n", {})
    for slice_name, what, against, against_label in (
            ("never_taught", "never-taught questions", ref_m, ref_label),
            ("general", "general questions", base_m, "the base model")):
        if 0 < n.get(slice_name, 0) < settings.gate_min_slice_items:
            reasons.append(f"not checked: only {n[slice_name]} {what} (a harm check needs at least "
                           f"{settings.gate_min_slice_items}; one answer worded differently is not a regression)")
            continue
        for suffix, how in (("", ""), ("_memory", " with the memory")):
            if suffix and not results.get("memory"):
                continue
            ok &= _no_worse(reasons, what + how, _f1(cand_m, slice_name + suffix),
                            _f1(against, slice_name + suffix), against_label, tol)
    cand_loss = cand_m.get("eval_loss")
    base_loss = base_m.get("eval_loss")
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
    return Verdict(bool(ok), reasons)
