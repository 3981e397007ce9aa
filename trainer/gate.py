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
    reasons: list[str] = []
    reference = results["reference"]
    ref_label = "production" if reference == "production" else "the base model (nothing in production)"
    cand_m, ref_m, base_m = results[CANDIDATE], results[reference], results["base"]
    checks = [  # every check runs, so the verdict lists all that was found
        _enough_recall_items(reasons, results["n_eval"], settings),
        _recall_better(reasons, cand_m, ref_m, ref_label, settings),
        not results.get("memory") or _no_worse(reasons, "recall with the memory", _f1(cand_m, "recall_memory"),
                                               _f1(ref_m, "recall_memory"), ref_label,
                                               settings.gate_regression_tolerance),
        _golden_kept(reasons, results.get("golden_lost", []), cand_m, ref_label, settings),
        _harm_checks(reasons, results, cand_m, ref_m, base_m, ref_label, settings),
        _losses_sane(reasons, final_train_loss, cand_m.get("eval_loss"), base_m.get("eval_loss"), settings),
    ]
    return Verdict(all(checks), reasons)


def _enough_recall_items(reasons: list[str], n_eval: int, settings) -> bool:
    if n_eval < settings.gate_min_eval_items:
        reasons.append(f"failed: only {n_eval} recall items (paraphrases of taught answers); the gate needs at "
                       f"least {settings.gate_min_eval_items}: teach a few more answers")
        return False
    reasons.append(f"passed: {n_eval} recall items (at least {settings.gate_min_eval_items} needed)")
    return True


def _recall_better(reasons: list[str], cand_m: dict, ref_m: dict, ref_label: str, settings) -> bool:
    """The deciding check: the primary metric beats the reference's by at least the margin."""
    name, cand = primary_metric(cand_m)
    _, ref = primary_metric(ref_m)
    if cand is None or ref is None:
        reasons.append(f"failed: no {name} could be computed (nothing taught to recall)")
        return False
    delta = cand - ref
    words = f"{name} {cand:.3f} vs {ref:.3f} for {ref_label} ({delta:+.3f}; margin {settings.gate_margin:+.3f})"
    if delta >= settings.gate_margin:
        reasons.append(f"passed: {words}")
        return True
    reasons.append(f"failed: not better enough: {words}")
    return False


def _golden_kept(reasons: list[str], lost: list[int], cand_m: dict, ref_label: str, settings) -> bool:
    total = cand_m.get("golden_total", 0)
    if len(lost) > settings.gate_golden_tolerance:
        shown = ", ".join(f"#{example_id}" for example_id in lost[:10]) + (", …" if len(lost) > 10 else "")
        reasons.append(f"failed: {len(lost)} golden item(s) that {ref_label} answered right are now wrong "
                       f"(tolerance {settings.gate_golden_tolerance}): examples {shown}")
        return False
    reasons.append(f"passed: golden set {cand_m.get('golden_passed', 0)}/{total} right, "
                   f"{len(lost)} regression(s) (tolerance {settings.gate_golden_tolerance})")
    return True


def _harm_checks(reasons: list[str], results: dict, cand_m: dict, ref_m: dict, base_m: dict, ref_label: str,
                 settings) -> bool:
    """Never-taught questions against the reference, general ones against the base model, each
    without and with the memory; a slice too small to judge is not checked."""
    ok = True
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
                            _f1(against, slice_name + suffix), against_label, settings.gate_regression_tolerance)
    return ok


def _losses_sane(reasons: list[str], final_train_loss: float | None, cand_loss: float | None,
                 base_loss: float | None, settings) -> bool:
    if final_train_loss is None or not math.isfinite(final_train_loss):
        reasons.append(f"failed: training loss is not a finite number ({final_train_loss})")
        return False
    if cand_loss is not None and (not math.isfinite(cand_loss) or
                                  (base_loss and cand_loss > settings.gate_max_loss_ratio * base_loss)):
        reasons.append(f"failed: eval loss {cand_loss:.3f} is over {settings.gate_max_loss_ratio}x the base "
                       f"model's {base_loss:.3f}")
        return False
    shown = f"{cand_loss:.3f}" if cand_loss is not None else "n/a"
    base = f"{base_loss:.3f}" if base_loss is not None else "n/a"
    reasons.append(f"passed: losses sane (train {final_train_loss:.3f}, eval {shown}, base eval {base})")
    return True
