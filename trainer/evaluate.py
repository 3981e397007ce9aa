"""Evaluate candidate, production and base in one process: one base model in memory, the
candidate and production as two PEFT adapters on it, the base with adapters disabled.

What is scored is what users see: recall (taught facts asked in words nobody trained on), the
never-taught slice and general questions (harm checks), each without and with the correction
memory, planned exactly as the bot plans (flywheel.memory); the golden set must stay right."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch

from flywheel.adapters import verify_adapter
from flywheel.logs import get_logger
from flywheel.precision import inference_autocast
from flywheel.prompt import question_of
from trainer.batching import collate
from trainer.encode import encode_example
from trainer.generate import generate_answers
from trainer.metrics import answer_metrics, label_metrics, parse_label, token_f1
from trainer.modeling import answer_loss
from trainer.preference import encode_pairs, is_pair, preference_metrics, repeats_rejected

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
def eval_loss(model, tokenizer, rows, device, batch_size: int = 16,
              on_batch: Callable[[], None] | None = None) -> float | None:
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
        if on_batch is not None:
            on_batch()
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


def eval_memory(train_rows: list[dict], settings):
    """The correction memory as production would hold it for these items: every taught answer
    of the training set (not its paraphrases), embedded with the production embedder."""
    from flywheel.memory import Memory, MemorySettings, Recalled, item_vectors
    from trainer.dataset import TAUGHT_SOURCES

    mem_settings = MemorySettings()
    if not mem_settings.memory:
        return None
    memory = Memory(mem_settings)
    taught = [r for r in train_rows if not r["augmented"] and r["label"] is None
              and (r["source"] in TAUGHT_SOURCES or r["golden"])]
    if taught:
        vectors = item_vectors(memory.embedder, [(r["messages"][-1]["content"], r["answer"]) for r in taught])
        for i, (row, vec) in enumerate(zip(taught, vectors)):
            memory.index.add(Recalled(i, row["messages"][-1]["content"], row["answer"], row["source"], None,
                                      datetime.now(timezone.utc), 0.0), vec)
    return memory


def plan_rows(memory, rows: list[dict]) -> list:
    """Each row's memory plan, exactly as the bot plans an answer (flywheel.memory.plan)."""
    from flywheel.memory import MemoryPlan, plan, search_k

    answers = [i for i, r in enumerate(rows) if r["label"] is None]  # the memory holds answers, not labels
    plans = [MemoryPlan() for _ in rows]
    if memory is None or not len(memory.index) or not answers:
        return plans
    vectors = memory.embedder.embed([question_of(rows[i]["messages"]) for i in answers])
    for i, v in zip(answers, vectors):
        plans[i] = plan(memory.index.search(v, channel=None, k=search_k(memory.settings)), memory.settings)
    return plans


SLICES = ("recall", "never_taught", "general", "golden")


def evaluate(model, tokenizer, splits: dict[str, list[dict]], labels: list[str], settings, *,
             device: torch.device, production=None, memory=None, on_batch: Callable[[], None] | None = None) -> dict:
    """Per variant (candidate, production, base): each slice answered the way production answers,
    without the memory and with it (answers straight from the memory need no generation), plus
    eval loss on the recall slice and the golden results. Identical prompts are generated once.
    `on_batch`: called after each batch generated or scored (the trainer's progress)."""
    variants = _load_variants(model, production)
    rows = {name: list(splits.get(name, []))[: settings.max_eval_items] for name in SLICES}
    plans = {name: plan_rows(memory, rows[name]) for name in SLICES if name != "golden"}
    prompts, wanted = _prompts(rows, plans)
    results: dict = {"variants": variants, "n_eval": len(rows["recall"]), "n_golden": len(rows["golden"]),
                     "n": {name: len(rows[name]) for name in SLICES}, "memory": memory is not None,
                     "memory_direct": {name: sum(bool(p.direct) for p in plans[name]) for name in plans},
                     "production_version": production.name if production is not None else None}
    answers: dict[str, dict] = {}
    pairs = encode_pairs(tokenizer, rows["recall"], settings.max_length)  # taught vs voted down, asked anew
    try:
        for name in variants:
            answers[name], results[name] = _evaluate_variant(model, tokenizer, name, rows, prompts, wanted, pairs,
                                                             labels, settings, device, on_batch)
    finally:
        if PRODUCTION in variants:
            model.delete_adapter(PRODUCTION)
    results.update(_comparisons(rows, variants, answers, labels, settings))
    return results


def _load_variants(model, production) -> list[str]:
    """The variants to score; production's adapter (checked against its digest) loaded beside
    the candidate when there is one."""
    variants = [CANDIDATE, BASE]
    if production is not None:
        verify_adapter(production.adapter_path, expected_sha256=production.adapter_sha256)
        model.load_adapter(str(Path(production.adapter_path)), adapter_name=PRODUCTION, is_trainable=False)
        variants.insert(1, PRODUCTION)
    return variants


def _prompts(rows: dict[str, list[dict]], plans: dict[str, list]) -> tuple[dict[str, list[dict]], list[tuple]]:
    """The unique prompts to generate (key → messages), and each wanted answer: (slice, with the
    memory, row index, prompt key, or the memory's direct answer)."""
    prompts: dict[str, list[dict]] = {}  # unique prompt key → messages
    wanted: list[tuple[str, bool, int, str | None, str | None]] = []  # slice, memory, i, key, direct
    for name in SLICES:
        for i, row in enumerate(rows[name]):
            key = json.dumps(row["messages"], sort_keys=True)
            prompts[key] = row["messages"]
            wanted.append((name, False, i, key, None))
            if name == "golden":
                continue
            p = plans[name][i]
            if p.direct:
                wanted.append((name, True, i, None, p.direct.answer))
            else:
                msgs = p.apply(row["messages"])
                mkey = json.dumps(msgs, sort_keys=True)
                prompts[mkey] = msgs
                wanted.append((name, True, i, mkey, None))
    return prompts, wanted


def _evaluate_variant(model, tokenizer, name: str, rows: dict[str, list[dict]], prompts: dict[str, list[dict]],
                      wanted: list[tuple], pairs, labels: list[str], settings, device: torch.device,
                      on_batch: Callable[[], None] | None) -> tuple[dict, dict]:
    """One variant's answers ((slice, with the memory, row index) → answer) and its metrics."""
    keys = list(prompts)
    with variant(model, name):
        prefs = preference_metrics(model, pairs, tokenizer.pad_token_id, device)
        with inference_autocast(device, settings.inference_bf16):  # as the gateway serves
            generated = generate_answers(model, tokenizer, [prompts[k] for k in keys], device=device,
                                         max_new_tokens=settings.eval_max_new_tokens,
                                         batch_size=settings.eval_batch_size, on_batch=on_batch) if keys else []
        loss_rows = rows["recall"] or rows["never_taught"]
        loss = eval_loss(model, tokenizer, loss_rows, device, settings.eval_batch_size, on_batch)
    by_key = dict(zip(keys, generated))
    got = {(sl, mem, i): (direct if key is None else by_key[key]) for sl, mem, i, key, direct in wanted}
    m = _metrics(rows, got, prefs, loss, labels, settings)
    log.info("evaluated", variant=name, recall_f1=m["recall"].get("token_f1"),
             recall_memory_f1=m["recall_memory"].get("token_f1"), eval_loss=loss,
             golden=f"{m['golden_passed']}/{len(rows['golden'])}")
    return got, m


def _metrics(rows: dict[str, list[dict]], got: dict, prefs, loss: float | None, labels: list[str],
             settings) -> dict:
    m: dict = {}
    for sl in ("recall", "never_taught", "general"):
        for mem in (False, True):
            preds = [got[(sl, mem, i)] for i in range(len(rows[sl]))]
            m[sl + ("_memory" if mem else "")] = score(rows[sl], preds, labels)
    m.update({k: v for k, v in m["recall"].items() if k != "labels"})  # the headline: recall, no memory
    for sl in ("recall", "never_taught"):  # label accuracy: taught labels asked anew, else held-out ones
        if "labels" in m[sl]:
            m["labels"] = m[sl]["labels"]
            break
    m["eval_loss"] = loss
    m["perplexity"] = math.exp(min(loss, 50)) if loss is not None else None
    m["preferences"] = _preferences(prefs, rows["recall"], [got[("recall", False, i)] for i in range(len(rows["recall"]))])
    m["golden_passed"] = sum(golden_pass(got[("golden", False, i)], r, labels, settings.golden_pass_f1)
                             for i, r in enumerate(rows["golden"]))
    m["golden_total"] = len(rows["golden"])
    return m


def _comparisons(rows: dict[str, list[dict]], variants: list[str], answers: dict[str, dict], labels: list[str],
                 settings) -> dict:
    """The golden items answered by each variant, those the candidate lost against the reference
    (production, else base), and a few recall samples side by side."""
    reference = PRODUCTION if PRODUCTION in variants else BASE
    golden = []
    for i, row in enumerate(rows["golden"]):
        entry = {"example_id": row["example_id"], "question": row["messages"][-1]["content"], "expected": row["answer"]}
        for name in variants:
            got = answers[name][("golden", False, i)]
            entry[name] = {"answer": got, "passed": golden_pass(got, row, labels, settings.golden_pass_f1)}
        golden.append(entry)
    return {
        "golden": golden,
        # by example id: the gate's reasons go to the admin channel, and a question may come from a DM
        "golden_lost": [g["example_id"] for g in golden if g[reference]["passed"] and not g[CANDIDATE]["passed"]],
        "reference": reference,
        "samples": [{"question": r["messages"][-1]["content"], "expected": r["answer"],
                     **{name: answers[name][("recall", False, i)] for name in variants},
                     **{f"{name}+memory": answers[name][("recall", True, i)] for name in variants}}
                    for i, r in enumerate(rows["recall"][:5])],
    }


def _preferences(prefs, rows: list[dict], predictions: list[str]) -> dict | None:
    """Margins on the held-out pairs, and how often the answer (no memory) repeats a rejected one."""
    if prefs is None:
        return None
    paired = [(p, r) for p, r in zip(predictions, rows) if is_pair(r)]
    repeats = sum(repeats_rejected(p, r["answer"], r["rejected_answer"]) for p, r in paired)
    return {"pairs": prefs.pairs, "mean_margin": prefs.mean_margin, "positive_share": prefs.positive_share,
            "repeats_rejected": repeats, "repeat_share": round(repeats / len(paired), 4) if paired else None}


def primary_metric(metrics: dict) -> tuple[str, float | None]:
    """Recall token F1 (taught facts asked in held-out words, no memory); label accuracy when
    there is nothing to recall but label items."""
    if metrics.get("n"):
        return "recall token F1", metrics.get("token_f1")
    if "labels" in metrics:
        return "label accuracy", metrics["labels"]["accuracy"]
    return "recall token F1", None
