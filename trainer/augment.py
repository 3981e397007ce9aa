"""Paraphrase augmentation (the seed's data-augmentation step), two kinds:
- rule templates (on by default, no model needed): a taught question wrapped and recased the
  ways people ask in chat. Two disjoint families: TRAIN phrasings are learned, RECALL phrasings
  are held out to measure whether a taught fact is recalled when asked differently.
- model paraphrases (optional): new phrasings generated through the gateway's OpenAI-compatible
  API, stored as examples marked "augmented" and only ever used in the train split."""
from __future__ import annotations

import hashlib
import re

import httpx
from sqlmodel import Session

from flywheel.logs import get_logger
from store.examples import list_examples, upsert_example

log = get_logger("trainer.augment")
PROMPT = ("Rewrite the following question in {n} different ways with the same meaning. "
          "Write one question per line, nothing else.\n\nQuestion: {q}")


_QUESTION_WORDS = {"what", "who", "whom", "whose", "where", "when", "which", "how", "why", "is", "are", "was",
                   "were", "do", "does", "did", "can", "could", "should", "will", "would", "may", "has",
                   "have", "am"}
TRAIN_TEMPLATES = (
    "Can you tell me {lower}",
    "Quick question: {q}",
    "{casual}",
    "Hey, {lower}",
    "Do you know {lower}",
    "I'd like to know {lower}",
)
RECALL_TEMPLATES = (
    "Could someone remind me: {lower}",
    "{bare}? I can't remember.",
    "any idea {casual}?",
)


def _forms(question: str) -> dict[str, str]:
    q = " ".join(question.split())
    bare = q.rstrip(" ?.!")
    first = bare.split(" ", 1)[0]
    lower = (q[0].lower() + q[1:]) if first.lower() in _QUESTION_WORDS else q
    return {"q": q if q.endswith("?") else bare + "?", "lower": lower if lower.endswith("?") else lower.rstrip(" .!") + "?",
            "bare": bare, "casual": bare.lower()}


def template_paraphrases(question: str, n: int, family: str = "train") -> list[str]:
    """Up to n rule paraphrases of a question from one family, picked by the question's hash so
    items get different phrasings (deterministic: same question, same paraphrases)."""
    templates = TRAIN_TEMPLATES if family == "train" else RECALL_TEMPLATES
    if n <= 0 or not question.strip():
        return []
    forms = _forms(question)
    start = int.from_bytes(hashlib.sha256(forms["q"].encode()).digest()[:4], "big") % len(templates)
    out, seen = [], {forms["q"].lower()}
    for i in range(len(templates)):
        text = templates[(start + i) % len(templates)].format(**forms)
        if text.lower() not in seen:
            seen.add(text.lower())
            out.append(text)
        if len(out) == n:
            break
    return out


class AugmentError(RuntimeError):
    """The gateway could not be reached or answered badly."""


def paraphrase(client: httpx.Client, question: str, n: int, model: str) -> list[str]:
    body = {"model": model, "temperature": 0.7, "max_tokens": 40 * n,
            "messages": [{"role": "user", "content": PROMPT.format(n=n, q=question)}]}
    resp = client.post("/v1/chat/completions", json=body)
    if resp.status_code != 200:
        raise AugmentError(f"gateway answered {resp.status_code}: {resp.text[:200]}")
    text = resp.json()["choices"][0]["message"]["content"]
    lines = [re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", ln).strip() for ln in text.splitlines()]
    seen, out = {question.strip().lower()}, []
    for ln in lines:
        if len(ln) > 3 and ln.lower() not in seen:
            seen.add(ln.lower())
            out.append(ln)
    return out[:n]


def augment_examples(session: Session, settings) -> int:
    """Paraphrase each train-split answer item once (items already augmented are skipped)."""
    if not settings.gateway_url:
        raise AugmentError("augmentation needs FLYWHEEL_GATEWAY_URL (the gateway generates the paraphrases)")
    rows = list_examples(session)
    done = {ex.provenance.get("augmented_from") for ex in rows if ex.source == "augmented"}
    headers = {"Authorization": f"Bearer {settings.gateway_api_key}"} if settings.gateway_api_key else {}
    created = 0
    with httpx.Client(base_url=settings.gateway_url.rstrip("/"), headers=headers, timeout=60.0) as client:
        for ex in rows:
            if ex.source == "augmented" or ex.id in done or ex.answer is None or ex.label is not None:
                continue
            question = ex.messages[-1]["content"]
            for alt in paraphrase(client, question, settings.augment_paraphrases, settings.augment_model):
                _row, new = upsert_example(session, messages=[*ex.messages[:-1], {"role": "user", "content": alt}],
                                           answer=ex.answer, source="augmented",
                                           provenance={"augmented_from": ex.id})
                created += new
    log.info("augmented", created=created)
    return created
