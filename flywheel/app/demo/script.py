"""The scripted week: questions, reactions and corrections; the same and paraphrased questions
with the correction memory (no retrain yet); a training run; an admin promotion; everything
again through the bot, and once more straight from the adapter without memory. Used by
`flywheel demo run` and the end-to-end test.

Phases, per question (asked as taught, or a paraphrase nobody trained on):
  before   the base model, same prompt as production, no memory
  docs     through the bot after the team's documents were imported, before any correction
           (only with `--docs`); each answer's cited sections are checked for its truth
  memory   through the bot after the corrections, before any training
  after    through the bot with the promoted adapter and the memory
  lora_only  the promoted adapter alone (memory off), same prompt"""
from __future__ import annotations

import html
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import httpx

from flywheel.app.demo.workspace import Answer, Workspace
from flywheel.precision import inference_autocast
from flywheel.prompt import PromptSettings, build_messages
from gateway.settings import GatewaySettings
from store.db import session_scope
from store.documents import list_documents, sections_of
from store.memory import count_memory
from store.versions import alias_target
from trainer.metrics import normalize_answer, token_f1

PEOPLE = ["UALICE01", "UBOB0001", "UCAROL01", "UDAVE001", "UERIN001"]
GOOD_ENOUGH_F1 = 0.5  # a person gives 👍 at or above this overlap with the truth, else 👎 + correction
PHASES = ("before", "docs", "memory", "after", "lora_only")
KINDS = ("asked", "paraphrase")
CITE_RECALL = 0.8  # a section holds an answer with its numbers and this share of its content words (answer_in)
_CITED = re.compile(r"\*([^*]+)\*, imported ")  # a section in a citation (flywheel.memory.citation)
# Left out when checking that a section holds an answer: what must be there is what the answer
# says, not how its sentence is built.
_FUNCTION_WORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "of", "in", "on", "at", "to", "for", "from", "by", "with", "as", "is",
    "are", "was", "were", "be", "been", "being", "has", "have", "had", "it", "its", "this", "that", "these",
    "those", "which", "who", "whom", "whose", "what", "when", "where", "how", "there", "their", "they"})


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
    # each phase's answer and its token F1 with the truth; F1 None: the phase did not run
    before: str = ""
    before_f1: float | None = None
    docs: str = ""
    docs_f1: float | None = None
    docs_cited: list[str] | None = None  # the sections the docs answer cites ("Doc › Section"); None: not asked
    docs_cite_ok: bool | None = None  # a cited section holds the truth (see answer_in); None: general or not asked
    memory: str = ""
    memory_f1: float | None = None
    memory_version: str | None = None
    after: str = ""
    after_f1: float | None = None
    after_version: str | None = None
    lora_only: str = ""
    lora_only_f1: float | None = None

    def record(self, phase: str, text: str, version: str | None = None, source: str | None = None) -> None:
        """One phase's answer; `source` is the bot's citation under it (the docs phase keeps the
        sections it names)."""
        setattr(self, phase, text)
        setattr(self, f"{phase}_f1", token_f1(text, self.truth))
        if phase in ("memory", "after"):
            setattr(self, f"{phase}_version", version)
        if phase == "docs":
            self.docs_cited = cited_sections(source)


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
    import torch  # torch and transformers: ~2 s, only for the two phases that ask the model directly

    from trainer.generate import generate_answers  # torch, transformers
    from trainer.modeling import load_base_model, load_tokenizer  # torch, transformers

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
    """The bot remembers a correction right after acking it (an import its sections before it
    exits); wait until the memory holds `count` items."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if memory_size() >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the correction memory did not reach {count} items within {timeout_s:.0f} s")


def memory_size() -> int:
    """Active items in the memory (corrections, golden answers, imported sections)."""
    with session_scope() as session:
        return count_memory(session)


def ask_bot(ws: Workspace, rows: list[Row], phase: str, say: Callable[[str], None]) -> None:
    """Every question through the bot, as the team would ask it."""
    for i, row in enumerate(rows, 1):
        answer = ws.ask(row.question, user=PEOPLE[i % len(PEOPLE)])
        row.record(phase, answer.text, answer.model_version, answer.source)
        marker = "↪ " if row.kind == "paraphrase" else ""
        cites = f"\n      cites {'; '.join(row.docs_cited) or 'nothing'}" if phase == "docs" else ""
        say(f"  [{i}/{len(rows)}] {marker}{row.question}\n      bot ({answer.model_version}): {_short(answer.text)}"
            f"  F1 {getattr(row, phase + '_f1'):.2f}{cites}")


def cited_sections(source: str | None) -> list[str]:
    """The document sections a citation under an answer names, as title paths: flywheel.memory's
    citation writes 'From *Handbook › Releases*, imported 2 Dec; *…*, imported …' (mrkdwn-escaped,
    '*' dropped from the title); a taught item's part ('Based on a correction by …') names none."""
    return [html.unescape(title) for title in _CITED.findall(source or "")]


def imported_sections() -> dict[str, list[str]]:
    """The texts of every active imported section by title path as a citation shows it ('*'
    dropped); a long section's chunks share their title."""
    out: dict[str, list[str]] = {}
    with session_scope() as session:
        for doc, _ in list_documents(session):
            for section in sections_of(session, doc.id, active=True):
                out.setdefault(section.title.replace("*", ""), []).append(section.text)
    return out


def content_words(text: str) -> list[str]:
    """The words that carry what a text says (names, numbers, terms): SQuAD-normalized tokens
    without function words."""
    return [w for w in normalize_answer(text).split() if w not in _FUNCTION_WORDS]


def answer_in(truth: str, text: str) -> bool:
    """Whether `text` (a document section) holds the answer `truth`: every word of the truth with
    a digit in it (a port, a time, a version) and at least CITE_RECALL of its content words occur
    in it. Token F1 would not do: a section says much more than one answer, so its precision, and
    the F1, stay low even when it holds every word of the answer."""
    words, have = content_words(truth), set(content_words(text))
    numbers = [w for w in words if any(c.isdigit() for c in w)]
    return (bool(words) and all(w in have for w in numbers)
            and sum(w in have for w in words) / len(words) >= CITE_RECALL)


def check_citations(rows: list[Row], sections: dict[str, list[str]]) -> None:
    """Per team-fact row asked in the docs phase: does a section its answer cites hold the truth
    (`sections`: imported_sections())? An answer that cites nothing is not ok."""
    for row in rows:
        if not row.general and row.docs_cited is not None:
            row.docs_cite_ok = any(answer_in(row.truth, text) for title in row.docs_cited
                                   for text in sections.get(title, []))


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
    """summary[kind][f"{phase}_f1"] for kind in asked/paraphrase (team facts only) and general,
    phase in PHASES: the mean token F1 over the rows asked through the bot again (see
    sample_recheck), None for a phase that did not run (docs without `--docs`; everything after
    `--until docs`); docs_cite_ok: the share of docs answers citing a section that holds their
    truth (team facts; None without the docs phase)."""
    rows = [r for r in rows if r.rechecked]
    out: dict = {}
    for kind in (*KINDS, "general"):
        sel = [r for r in rows if r.general] if kind == "general" else \
            [r for r in rows if r.kind == kind and not r.general]
        out[kind] = {"n": len(sel), **{f"{p}_f1": _mean([getattr(r, f"{p}_f1") for r in sel]) for p in PHASES}}
        if kind != "general":
            out[kind]["docs_cite_ok"] = _mean([float(r.docs_cite_ok) for r in sel if r.docs_cite_ok is not None])
    return out


def ran(rows: list[Row]) -> list[str]:
    """The phases any row was asked in, in order."""
    return [p for p in PHASES if any(getattr(r, f"{p}_f1") is not None for r in rows)]


_HEADS = {"before": "base answer", "docs": "with the docs (no correction)", "memory": "with memory (no retrain)",
          "after": "after (adapter + memory)"}  # lora_only: its F1 only


def render_table(rows: list[Row], width: int = 30) -> str:
    """A table of each phase's answer and every phase's F1 for the terminal (and
    demo-output/before_after.md); only the phases that ran."""
    phases = ran(rows)
    shown = [p for p in phases if p in _HEADS]
    scores = "F1 " + " → ".join(p.replace("lora_only", "adapter only") for p in phases)
    f1_width = max(len(scores), 7 * len(phases))
    head = "| " + " | ".join(f"{c:<{width}}" for c in ["question", *(_HEADS[p] for p in shown)]) + \
        f" | {scores:<{f1_width}} |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        q = ("↪ " if r.kind == "paraphrase" else "") + r.question
        f1 = " → ".join(_score(getattr(r, f"{p}_f1")) for p in phases)
        lines.append("| " + " | ".join(_cell(t, width) for t in [q, *(getattr(r, p) for p in shown)]) +
                     f" | {f1:<{f1_width}} |")
    return "\n".join(lines)


def write_results(out_dir: Path, rows: list[Row], extra: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "before_after.md").write_text(render_table([r for r in rows if r.rechecked]) + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"summary": summarize(rows), **extra, "rows": [asdict(r) for r in rows]}, indent=2, default=str) + "\n")


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 3) if xs else None


def _score(f1: float | None) -> str:
    return "  -" if f1 is None else f"{f1:.2f}"


def _short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _cell(text: str, width: int) -> str:
    text = " ".join((text or "").split()).replace("|", "/")
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


__all__ = ["Answer", "Fact", "Row", "load_facts", "make_rows", "play_week", "ask_bot", "ask_model",
           "wait_for_memory", "wait_for_production", "production_version", "summarize", "render_table",
           "write_results", "read_facts_file", "FactsFileError", "cited_sections", "imported_sections",
           "answer_in", "check_citations", "ran", "memory_size"]
