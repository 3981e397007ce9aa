"""The scripted week: questions, reactions and corrections; the same and paraphrased questions
with the correction memory (no retrain yet); a training run; an admin promotion; everything
again through the bot, and once more straight from the adapter without memory. Used by
`flywheel demo run` and the end-to-end test.

Phases, per question (asked as taught, or a paraphrase nobody trained on):
  before   the base model, same prompt as production, no memory
  memory   through the bot after the corrections, before any training
  after    through the bot with the promoted adapter and the memory
  lora_only  the promoted adapter alone (memory off), same prompt"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import httpx

from flywheel.app.demo.workspace import Answer, Workspace
from flywheel.prompt import PromptSettings, build_messages
from store.db import session_scope
from store.memory import count_memory
from store.versions import alias_target
from trainer.metrics import token_f1

PEOPLE = ["UALICE01", "UBOB0001", "UCAROL01", "UDAVE001", "UERIN001"]
GOOD_ENOUGH_F1 = 0.5  # a person gives 👍 at or above this overlap with the truth, else 👎 + correction
PHASES = ("before", "memory", "after", "lora_only")
KINDS = ("asked", "paraphrase")


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
    general: bool = False  # a general question (not a team fact)
    fact: int = -1  # which team fact (its index in the facts); -1 for general questions
    rechecked: bool = True  # asked through the bot again after the week (see sample_recheck)
    feedback: str = ""
    before: str = ""
    before_f1: float = 0.0
    memory: str = ""
    memory_f1: float = 0.0
    memory_version: str | None = None
    after: str = ""
    after_f1: float = 0.0
    after_version: str | None = None
    lora_only: str = ""
    lora_only_f1: float = 0.0

    def record(self, phase: str, text: str, version: str | None = None) -> None:
        setattr(self, phase, text)
        setattr(self, f"{phase}_f1", token_f1(text, self.truth))
        if phase in ("memory", "after"):
            setattr(self, f"{phase}_version", version)


class FactsFileError(ValueError):
    """The facts file cannot be used; the message names the line."""


def read_facts_file(path: Path) -> list[Fact]:
    """JSONL of {"question", "answer", "paraphrases": [...]}; every bad line is named."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FactsFileError(f"{path}: cannot read ({exc})") from exc
    facts, errors = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            q, a, p = row["question"], row["answer"], row.get("paraphrases", [])
            if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()
                    and isinstance(p, list) and all(isinstance(x, str) and x.strip() for x in p)):
                raise ValueError("needs non-empty 'question' and 'answer' strings and a list of 'paraphrases'")
            facts.append(Fact(q.strip(), a.strip(), [x.strip() for x in p]))
        except (ValueError, KeyError, TypeError) as exc:
            errors.append(f"line {n}: {exc}")
    if errors:
        raise FactsFileError(f"{path}: {len(errors)} bad line(s):\n  " + "\n  ".join(errors[:20]))
    if not facts:
        raise FactsFileError(f"{path}: no facts")
    return facts


def load_facts(limit: int | None = None, facts_file: Path | None = None) -> tuple[list[Fact], list[Fact]]:
    """(team facts, general questions): the bundled fictional company (40 facts) or the facts
    file, plus a few general questions the base model knows (they must stay right)."""
    data = resources.files("flywheel.app.demo").joinpath("data")
    if facts_file is not None:
        facts = read_facts_file(facts_file)
    else:
        facts = [Fact(**json.loads(line)) for line in data.joinpath("company_facts.jsonl").read_text().splitlines()]
    general = [Fact(**json.loads(line)) for line in data.joinpath("general_questions.jsonl").read_text().splitlines()]
    if limit is not None:
        facts, general = facts[:limit], general[: max(1, limit // 10)]
    return facts, general


def make_rows(facts: list[Fact], general: list[Fact], paraphrases: int) -> list[Row]:
    rows = []
    for i, fact in enumerate(facts):
        rows.append(Row(fact.question, fact.answer, "asked", fact=i))
        rows += [Row(p, fact.answer, "paraphrase", fact=i) for p in fact.paraphrases[:paraphrases]]
    rows += [Row(g.question, g.answer, "asked", general=True) for g in general]
    return rows


def ask_model(rows: list[Row], model_dir: Path, say: Callable[[str], None], max_tokens: int, *,
              adapter: str | None = None, phase: str = "before") -> None:
    """Every question to the base model (or base + adapter) with production's prompt and no
    memory, greedy, batched in this process: the gateway serves one request at a time, and these
    two phases ask every question without any Slack in between."""
    import torch

    from flywheel.precision import inference_autocast
    from gateway.settings import GatewaySettings
    from trainer.generate import generate_answers
    from trainer.modeling import load_base_model, load_tokenizer

    device = torch.device("cpu")
    tokenizer = load_tokenizer(model_dir)
    model = load_base_model(model_dir, device)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    prompts = [build_messages([{"role": "user", "content": r.question}], PromptSettings()) for r in rows]
    with inference_autocast(device, GatewaySettings().inference_bf16):  # as the gateway would answer
        answers = generate_answers(model.eval(), tokenizer, prompts, device=device, max_new_tokens=max_tokens)
    for row, text in zip(rows, answers):
        row.record(phase, text)
    say(f"  {phase}: {len(rows)} answers")


def play_week(ws: Workspace, rows: list[Row], say: Callable[[str], None], seed: int = 0) -> int:
    """Monday to Thursday: everyone asks, judges the answer, and reacts or corrects.
    Returns the number of corrections."""
    rng = random.Random(seed)
    asked = [r for r in rows if r.kind == "asked"]
    corrections = 0
    for i, row in enumerate(asked, 1):
        person = rng.choice(PEOPLE)
        answer = ws.ask(row.question, user=person)
        f1 = token_f1(answer.text, row.truth)
        if f1 >= GOOD_ENOUGH_F1:
            ws.react(answer, "+1", user=person)
            row.feedback = "👍"
        else:
            ws.react(answer, "-1", user=person)
            ws.correct(answer, row.truth, user=person)
            row.feedback = "👎 + correction"
            corrections += 1
        say(f"  [{i}/{len(asked)}] {row.question}\n      bot ({answer.model_version}): {_short(answer.text)}"
            f"\n      F1 {f1:.2f} → {row.feedback}")
    return corrections


def wait_for_memory(count: int, timeout_s: float = 60.0) -> None:
    """The bot remembers a correction right after acking it; wait until all are in."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with session_scope() as session:
            if count_memory(session) >= count:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the correction memory did not reach {count} items within {timeout_s:.0f} s")


def ask_bot(ws: Workspace, rows: list[Row], phase: str, say: Callable[[str], None]) -> None:
    """Every question through the bot, as the team would ask it."""
    for i, row in enumerate(rows, 1):
        answer = ws.ask(row.question, user=PEOPLE[i % len(PEOPLE)])
        row.record(phase, answer.text, answer.model_version)
        marker = "↪ " if row.kind == "paraphrase" else ""
        say(f"  [{i}/{len(rows)}] {marker}{row.question}\n      bot ({answer.model_version}): {_short(answer.text)}"
            f"  F1 {getattr(row, phase + '_f1'):.2f}")


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


def production_version() -> str | None:
    with session_scope() as session:
        return alias_target(session)


def sample_recheck(rows: list[Row], facts: int | None, seed: int = 0) -> list[Row]:
    """The rows asked through the bot again after the week: every general question and, with
    `facts`, the questions and paraphrases of a seeded sample of that many facts (a large fact
    set's every question twice through the bot takes hours on CPU); None: all rows."""
    taught = sorted({r.fact for r in rows if not r.general})
    if facts is not None and facts < len(taught):
        keep = set(random.Random(f"recheck:{seed}").sample(taught, facts))
        for r in rows:
            r.rechecked = r.general or r.fact in keep
    return [r for r in rows if r.rechecked]


def summarize(rows: list[Row]) -> dict:
    """summary[kind][phase] for kind in asked/paraphrase, phase in {before,memory,after,lora_only}_f1
    (team facts only), plus the general questions under "general"; every phase over the same rows
    (those asked through the bot again, see sample_recheck)."""
    def mean(xs):
        return round(sum(xs) / len(xs), 3) if xs else None

    rows = [r for r in rows if r.rechecked]
    out: dict = {}
    for kind in KINDS:
        sel = [r for r in rows if r.kind == kind and not r.general]
        out[kind] = {"n": len(sel), **{f"{p}_f1": mean([getattr(r, f"{p}_f1") for r in sel]) for p in PHASES}}
    gen = [r for r in rows if r.general]
    out["general"] = {"n": len(gen), **{f"{p}_f1": mean([getattr(r, f"{p}_f1") for r in gen]) for p in PHASES}}
    return out


def render_table(rows: list[Row], width: int = 30) -> str:
    """A before/memory/after table for the terminal (and demo-output/before_after.md)."""
    head = (f"| {'question':<{width}} | {'base answer':<{width}} | {'with memory (no retrain)':<{width}} | "
            f"{'after (adapter + memory)':<{width}} | F1 before → memory → after → adapter only |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        q = ("↪ " if r.kind == "paraphrase" else "") + r.question
        f1 = f"{r.before_f1:.2f} → {r.memory_f1:.2f} → {r.after_f1:.2f} → {r.lora_only_f1:.2f}"
        lines.append(f"| {_cell(q, width)} | {_cell(r.before, width)} | {_cell(r.memory, width)} | "
                     f"{_cell(r.after, width)} | {f1:<41} |")
    return "\n".join(lines)


def write_results(out_dir: Path, rows: list[Row], extra: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "before_after.md").write_text(render_table([r for r in rows if r.rechecked]) + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"summary": summarize(rows), **extra, "rows": [asdict(r) for r in rows]}, indent=2, default=str) + "\n")


def _short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(text: str, width: int) -> str:
    text = " ".join((text or "").split()).replace("|", "/")
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


__all__ = ["Answer", "Fact", "Row", "load_facts", "make_rows", "play_week", "ask_bot", "ask_model",
           "wait_for_memory", "wait_for_production", "production_version", "summarize", "render_table",
           "write_results", "read_facts_file", "FactsFileError"]
