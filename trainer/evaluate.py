"""Evaluate candidate, production and base in one process: one base model in memory, the
candidate and production as two PEFT adapters on it, the base with adapters disabled."""
from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from flywheel.adapters import verify_adapter
from flywheel.logs import get_logger
from trainer.batching import collate
from trainer.encode import encode_example
from trainer.generate import generate_answers
from trainer.metrics import answer_metrics, label_metrics, parse_label, token_f1
from trainer.modeling import answer_loss

log = get_logger("trainer.evaluate")
CANDIDATE, PRODUCTION, BASE = "candidate", "production", "base"


@contextmanager
def variant(model, name: str):
    """Run the wrapped model as one of the three variants."""
    if name == BASE:
        with model.disable_adapter():
            yield
        return
    model.set_adapter("default" if name == CANDIDATE else name)
    try:
        yield
    finally:
        model.set_adapter("default")


@torch.no_grad()
def eval_loss(model, tokenizer, rows, device, batch_size: int = 16) -> float | None:
    """Mean cross-entropy per answer token (perplexity = exp of it)."""
    encs = [encode_example(tokenizer, r["messages"], r["answer"]) for r in rows]
    if not encs:
        return None
    encs.sort(key=len)
    total, count = 0.0, 0
    for i in range(0, len(encs), batch_size):
        batch = {k: v.to(device) for k, v in collate(encs[i:i + batch_size], tokenizer.pad_token_id).items()}
        loss, n = answer_loss(model, batch)
        total, count = total + float(loss), count + n
    return total / count if count else None


def score(rows: list[dict], predictions: list[str], labels: list[str]) -> dict:
    text = [(p, r) for p, r in zip(predictions, rows) if r["label"] is None]
    lab = [(p, r) for p, r in zip(predictions, rows) if r["label"] is not None]
    out = answer_metrics([p for p, _ in text], [r["answer"] for _, r in text])
    if lab:
        out["labels"] = label_metrics([parse_label(p, labels) for p, _ in lab], [r["label"] for _, r in lab], labels)
    return out


def golden_pass(prediction: str, row: dict, labels: list[str], threshold: float) -> bool:
    if row["label"] is not None:
        return parse_label(prediction, labels) == row["label"]
    return token_f1(prediction, row["answer"]) >= threshold


def evaluate(model, tokenizer, eval_rows: list[dict], golden_rows: list[dict], labels: list[str], settings, *,
             device: torch.device, production=None) -> dict:
    """Metrics, eval loss and golden results per variant, plus a few sample answers."""
    variants = [CANDIDATE, BASE]
    if production is not None:
        verify_adapter(production.adapter_path, expected_sha256=production.adapter_sha256)
        model.load_adapter(str(Path(production.adapter_path)), adapter_name=PRODUCTION, is_trainable=False)
        variants.insert(1, PRODUCTION)
    eval_rows = eval_rows[: settings.max_eval_items]
    golden_rows = golden_rows[: settings.max_eval_items]
    convs = [r["messages"] for r in eval_rows] + [r["messages"] for r in golden_rows]
    results: dict = {"variants": variants, "n_eval": len(eval_rows), "n_golden": len(golden_rows),
                     "production_version": production.name if production is not None else None}
    answers: dict[str, list[str]] = {}
    try:
        for name in variants:
            with variant(model, name):
                preds = generate_answers(model, tokenizer, convs, device=device,
                                         max_new_tokens=settings.max_new_tokens, batch_size=settings.eval_batch_size)
                loss = eval_loss(model, tokenizer, eval_rows, device, settings.eval_batch_size)
            answers[name] = preds
            ev, gd = preds[: len(eval_rows)], preds[len(eval_rows):]
            m = score(eval_rows, ev, labels)
            m["eval_loss"] = loss
            m["perplexity"] = math.exp(min(loss, 50)) if loss is not None else None
            m["golden_passed"] = sum(golden_pass(p, r, labels, settings.golden_pass_f1) for p, r in zip(gd, golden_rows))
            m["golden_total"] = len(golden_rows)
            results[name] = m
            log.info("evaluated", variant=name, token_f1=m.get("token_f1"), eval_loss=loss,
                     golden=f"{m['golden_passed']}/{len(golden_rows)}")
    finally:
        if PRODUCTION in variants:
            model.delete_adapter(PRODUCTION)
    reference = PRODUCTION if PRODUCTION in variants else BASE
    golden = []
    for i, row in enumerate(golden_rows):
        j = len(eval_rows) + i
        entry = {"question": row["messages"][-1]["content"], "expected": row["answer"]}
        for name in variants:
            entry[name] = {"answer": answers[name][j],
                           "passed": golden_pass(answers[name][j], row, labels, settings.golden_pass_f1)}
        golden.append(entry)
    results["golden"] = golden
    results["golden_lost"] = [g["question"] for g in golden if g[reference]["passed"] and not g[CANDIDATE]["passed"]]
    results["reference"] = reference
    results["samples"] = [{"question": r["messages"][-1]["content"], "expected": r["answer"],
                           **{name: answers[name][i] for name in variants}} for i, r in enumerate(eval_rows[:5])]
    return results


def primary_metric(metrics: dict) -> tuple[str, float | None]:
    """Token F1 on answer items; label accuracy when the eval set has only label items."""
    if metrics.get("n"):
        return "token F1", metrics.get("token_f1")
    if "labels" in metrics:
        return "label accuracy", metrics["labels"]["accuracy"]
    return "token F1", None
