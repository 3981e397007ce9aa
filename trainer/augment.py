"""Optional paraphrase augmentation (off by default): new phrasings of training questions,
generated through the gateway's OpenAI-compatible API, stored as examples marked
"augmented" and only ever used in the train split (dataset.select_items enforces that)."""
from __future__ import annotations

import re

import httpx
from sqlmodel import Session

from flywheel.logs import get_logger
from store.examples import list_examples, upsert_example
from trainer.dataset import hash_split

log = get_logger("trainer.augment")
PROMPT = ("Rewrite the following question in {n} different ways with the same meaning. "
          "Write one question per line, nothing else.\n\nQuestion: {q}")


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
            if hash_split(question, settings.eval_fraction) != "train":
                continue
            for alt in paraphrase(client, question, settings.augment_paraphrases, settings.augment_model):
                _row, new = upsert_example(session, messages=[*ex.messages[:-1], {"role": "user", "content": alt}],
                                           answer=ex.answer, source="augmented",
                                           provenance={"augmented_from": ex.id})
                created += new
    log.info("augmented", created=created)
    return created
