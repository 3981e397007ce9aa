"""The scripted week: questions, reactions and corrections; a training run; an admin promotion;
the same and paraphrased questions again. Used by `flywheel demo run` and the end-to-end test."""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import httpx

from flywheel.demo.workspace import Answer, Workspace
from store.db import session_scope
from store.versions import alias_target
from trainer.metrics import token_f1

PEOPLE = ["UALICE01", "UBOB0001", "UCAROL01", "UDAVE001", "UERIN001"]
GOOD_ENOUGH_F1 = 0.5  # a person gives 👍 at or above this overlap with the truth, else 👎 + correction


@dataclass
class Fact:
    question: str
    answer: str
    paraphrases: list[str] = field(default_factory=list)


@dataclass
class Row:
    question: str
    truth: str
    kind: str  # asked / paraphrase
    before: str = ""
    before_f1: float = 0.0
    after: str = ""
    after_f1: float = 0.0
    after_version: str | None = None
    feedback: str = ""


def load_facts(limit: int | None = None) -> list[Fact]:
    """The bundled fictional company (40 facts) plus a few general questions the base model knows."""
    data = resources.files("flywheel.demo").joinpath("data")
    facts = [Fact(**json.loads(line)) for line in data.joinpath("company_facts.jsonl").read_text().splitlines()]
    general = [Fact(**json.loads(line)) for line in data.joinpath("general_questions.jsonl").read_text().splitlines()]
    if limit is not None:
        facts, general = facts[:limit], general[: max(1, limit // 10)]
    return facts + general


def play_week(ws: Workspace, facts: list[Fact], say: Callable[[str], None], seed: int = 0) -> list[Row]:
    """Monday to Thursday: everyone asks, judges the answer, and reacts or corrects."""
    rng = random.Random(seed)
    rows = []
    for i, fact in enumerate(facts, 1):
        person = rng.choice(PEOPLE)
        answer = ws.ask(fact.question, user=person)
        f1 = token_f1(answer.text, fact.answer)
        row = Row(fact.question, fact.answer, "asked", before=answer.text, before_f1=f1)
        if f1 >= GOOD_ENOUGH_F1:
            ws.react(answer, "+1", user=person)
            row.feedback = "👍"
        else:
            ws.react(answer, "-1", user=person)
            ws.correct(answer, fact.answer, user=person)
            row.feedback = "👎 + correction"
        say(f"  [{i}/{len(facts)}] {fact.question}\n      bot ({answer.model_version}): {_short(answer.text)}"
            f"\n      F1 {f1:.2f} → {row.feedback}")
        rows.append(row)
    return rows


def wait_for_production(gateway_url: str, version: str, timeout_s: float = 120.0, api_key: str | None = None) -> float:
    """Seconds until the gateway answers `production` with `version` (the hot-swap is done)."""
    start, headers = time.monotonic(), ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    body = {"model": "production", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    while time.monotonic() - start < timeout_s:
        try:
            resp = httpx.post(f"{gateway_url}/v1/chat/completions", json=body, headers=headers, timeout=30)
            if resp.status_code == 200 and resp.json().get("model") == version:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the gateway did not serve {version} as production within {timeout_s:.0f} s")


def ask_again(ws: Workspace, facts: list[Fact], rows: list[Row], gateway_url: str, say: Callable[[str], None],
              paraphrases: int = 1, max_tokens: int = 64) -> list[Row]:
    """Friday: the same questions through the bot, plus paraphrases (base answers straight from the gateway)."""
    by_question = {r.question: r for r in rows}
    out = []
    for i, fact in enumerate(facts, 1):
        row = by_question[fact.question]
        answer = ws.ask(fact.question, user=PEOPLE[i % len(PEOPLE)])
        row.after, row.after_version = answer.text, answer.model_version
        row.after_f1 = token_f1(answer.text, fact.answer)
        out.append(row)
        say(f"  [{i}/{len(facts)}] {fact.question}\n      bot ({answer.model_version}): {_short(answer.text)}"
            f"  F1 {row.before_f1:.2f} → {row.after_f1:.2f}")
        for para in fact.paraphrases[:paraphrases]:
            base = _gateway_answer(gateway_url, "base", para, max_tokens)
            new = ws.ask(para, user=PEOPLE[(i + 1) % len(PEOPLE)])
            prow = Row(para, fact.answer, "paraphrase", before=base, before_f1=token_f1(base, fact.answer),
                       after=new.text, after_f1=token_f1(new.text, fact.answer), after_version=new.model_version)
            out.append(prow)
            say(f"      paraphrase: {para}\n      bot ({new.model_version}): {_short(new.text)}"
                f"  F1 {prow.before_f1:.2f} → {prow.after_f1:.2f}")
    return out


def _gateway_answer(gateway_url: str, model: str, question: str, max_tokens: int) -> str:
    resp = httpx.post(f"{gateway_url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
        "temperature": 0})
    resp.raise_for_status()
    return resp.json()["choices"][0]["message"]["content"]


def production_version() -> str | None:
    with session_scope() as session:
        return alias_target(session)


def summarize(rows: list[Row]) -> dict:
    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else None

    out = {}
    for kind in ("asked", "paraphrase"):
        sel = [r for r in rows if r.kind == kind]
        out[kind] = {"n": len(sel), "before_f1": mean([r.before_f1 for r in sel]),
                     "after_f1": mean([r.after_f1 for r in sel])}
    return out


def render_table(rows: list[Row], width: int = 38) -> str:
    """A before/after table for the terminal (and demo-output/before_after.md)."""
    head = f"| {'question':<{width}} | {'base answer':<{width}} | {'new answer':<{width}} | F1 before → after |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        q = ("↪ " if r.kind == "paraphrase" else "") + r.question
        f1 = f"{r.before_f1:.2f} → {r.after_f1:.2f}"
        lines.append(f"| {_cell(q, width)} | {_cell(r.before, width)} | {_cell(r.after, width)} | {f1:<17} |")
    return "\n".join(lines)


def write_results(out_dir: Path, rows: list[Row], extra: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "before_after.md").write_text(render_table(rows) + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"summary": summarize(rows), **extra, "rows": [asdict(r) for r in rows]}, indent=2, default=str) + "\n")


def _short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(text: str, width: int) -> str:
    text = " ".join((text or "").split()).replace("|", "/")
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


__all__ = ["Answer", "Fact", "Row", "load_facts", "play_week", "ask_again", "wait_for_production",
           "production_version", "summarize", "render_table", "write_results"]
