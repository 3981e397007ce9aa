"""Answer metrics: SQuAD-style token F1 and exact match, ROUGE-L (LCS F-measure), and
accuracy / macro precision, recall, F1 for label items. Small enough to own; no extra heavy deps."""
from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in (text or "").lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_metrics(predictions: list[str], references: list[str]) -> dict:
    n = len(references)
    if n == 0:
        return {"n": 0}
    return {"n": n,
            "token_f1": sum(map(token_f1, predictions, references)) / n,
            "exact_match": sum(map(exact_match, predictions, references)) / n,
            "rouge_l": sum(map(rouge_l, predictions, references)) / n}


def parse_label(text: str, labels: list[str]) -> str | None:
    """The label a generated answer names: an exact match, else the first label mentioned."""
    norm = normalize_answer(text)
    by_norm = {normalize_answer(lab): lab for lab in labels}
    if norm in by_norm:
        return by_norm[norm]
    hits = [(norm.find(k), v) for k, v in by_norm.items() if k and re.search(rf"\b{re.escape(k)}\b", norm)]
    return min(hits)[1] if hits else None


def label_metrics(predicted: list[str | None], gold: list[str], labels: list[str]) -> dict:
    n = len(gold)
    if n == 0:
        return {"n": 0}
    per = {}
    for lab in labels:
        tp = sum(p == lab and g == lab for p, g in zip(predicted, gold))
        fp = sum(p == lab and g != lab for p, g in zip(predicted, gold))
        fn = sum(p != lab and g == lab for p, g in zip(predicted, gold))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    present = [lab for lab in labels if per[lab]["support"]] or labels
    return {"n": n, "accuracy": sum(p == g for p, g in zip(predicted, gold)) / n,
            "precision": sum(per[lab]["precision"] for lab in present) / len(present),
            "recall": sum(per[lab]["recall"] for lab in present) / len(present),
            "f1": sum(per[lab]["f1"] for lab in present) / len(present), "per_label": per}
