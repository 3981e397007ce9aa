"""Documents become training data, reviewed (issue 28): the seed's labeling step done by the
model. For each section of an imported document not yet asked about in its current text, the
model is asked through the gateway (as trainer/augment.py asks for paraphrases) for the questions
the section answers, each with a short answer taken from the section. Every pair is checked:
- complete, and the question a question (ends with "?"), not one already generated for the document;
- the answer supported by the section: at least `docs_questions_min_support` of its content words
  are the section's own (what the model added is not in the document);
- the question finds its own section first among the document's sections, by the memory's
  embedder and item vectors (flywheel.memory.item_vectors): a question that would find another
  section is not this section's question.
What passes waits for review (store/docquestions.py); what fails is kept as `filtered`, with the
check it failed, for the per-document report. A reply that holds no pair stores nothing (the
section is asked again next time); a gateway that fails stops the run, the rest waits."""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
from sqlmodel import Session

from flywheel.logs import get_logger
from flywheel.memory import item_vectors
from store.docquestions import add_questions, current_questions, sections_to_ask
from store.documents import sections_of
from store.models import Document, DocumentSection
from trainer.augment import AugmentError, complete
from trainer.docsource import DocumentSettings
from trainer.metrics import normalize_answer

log = get_logger("trainer.docquestions")
INCOMPLETE, NOT_A_QUESTION, DUPLICATE = "incomplete", "not a question", "duplicate"
UNSUPPORTED, OTHER_SECTION = "answer not in the section", "finds another section"
TOKENS_PER_PAIR = 60
SYSTEM = ("You write the questions that a section of a team's documents answers, worded as people ask in "
          "chat. Give each question a short answer copied from the section's own words. Write each pair as "
          "two lines, 'Q: <question>' then 'A: <answer>', and nothing else.")
SHOT = ("Travel policy › Trains",
        "Book trains in second class. First class is refunded only for trips over four hours.",
        (("Which class should I book for a train trip?", "second class"),
         ("When is a first class ticket refunded?", "only for trips over four hours")))
# words that carry no fact: an answer's support is counted over the others
STOPWORDS = frozenset({
    "a", "an", "the", "and", "or", "but", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as",
    "is", "are", "was", "were", "be", "been", "being", "it", "its", "this", "that", "these", "those", "there",
    "here", "do", "does", "did", "done", "have", "has", "had", "can", "could", "should", "would", "will",
    "shall", "may", "might", "must", "you", "your", "yours", "we", "our", "us", "they", "them", "their", "he",
    "she", "his", "her", "i", "me", "my", "not", "no", "yes", "so", "if", "then", "than", "also", "only",
    "just", "all", "any", "each", "every", "some", "into", "onto", "about", "over", "under", "up", "down",
    "out", "off", "per", "via"})
_PAIR_LINE = re.compile(r"^\s*(?:\d+[.)]\s*|[-*•]\s*)?\**(q|question|a|answer)\s*\d*\**\s*[:.)]\**\s*(.*)$",
                        re.IGNORECASE)


@dataclass
class Generation:
    """What one run did for one document."""

    document: Document
    asked: int = 0  # sections asked
    kept: int = 0  # pairs that wait for review
    filtered: Counter = field(default_factory=Counter)  # the check failed → pairs
    unanswered: int = 0  # sections whose reply held no pair (asked again next time)
    left: int = 0  # sections not asked: the gateway failed (asked next time)
    error: str | None = None


def question_messages(title: str, text: str, n: int) -> list[dict]:
    """The instruction, one worked example, then the section."""
    def ask(heading: str, body: str, k: int) -> dict:
        return {"role": "user", "content": f"Section: {heading}\n\n{body}\n\n"
                                           f"Write {k} questions this section answers, each with its short answer."}

    shot_title, shot_text, pairs = SHOT
    return [{"role": "system", "content": SYSTEM}, ask(shot_title, shot_text, len(pairs)),
            {"role": "assistant", "content": "\n".join(f"Q: {q}\nA: {a}" for q, a in pairs)}, ask(title, text, n)]


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs in a model's reply: a JSON list of {"question", "answer"}
    objects anywhere in it, else 'Q:' / 'A:' lines (numbered, bulleted or bold too). Anything
    else is no pair: a bad reply yields none."""
    return _json_pairs(text) or _line_pairs(text)


def _json_pairs(text: str) -> list[tuple[str, str]]:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return []
    try:
        items = json.loads(text[start:end + 1])
    except json.JSONDecodeError:
        return []
    if not isinstance(items, list):
        return []
    return [(str(it["question"]).strip(), str(it["answer"]).strip()) for it in items
            if isinstance(it, dict) and isinstance(it.get("question"), str) and isinstance(it.get("answer"), str)]


def _line_pairs(text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    question = None
    for line in text.splitlines():
        found = _PAIR_LINE.match(line)
        if found is None:
            continue
        value = found.group(2).strip().strip('"“”').strip()
        if found.group(1)[0].lower() == "q":
            question = value
        elif question is not None:
            pairs.append((question, value))
            question = None
    return pairs


def support(answer: str, section: str) -> float:
    """The share of the answer's content words (SQuAD-normalized, stopwords aside) that the
    section's words hold; 0 for an answer with none."""
    words = [w for w in normalize_answer(answer).split() if w not in STOPWORDS]
    if not words:
        return 0.0
    found = set(normalize_answer(section).split())
    return sum(w in found for w in words) / len(words)


def _first_failure(question: str, answer: str, section: DocumentSection, seen: set[str],
                   min_support: float) -> str | None:
    """The first check (short of retrieval) a pair fails, or None."""
    if not question or not answer:
        return INCOMPLETE
    if not question.endswith("?"):
        return NOT_A_QUESTION
    key = normalize_answer(question)
    if key in seen:
        return DUPLICATE
    seen.add(key)
    if support(answer, f"{section.title}\n{section.text}") < min_support:
        return UNSUPPORTED
    return None


def check_pairs(pairs: list[tuple[str, str]], own: int, sections: list[DocumentSection], vectors: np.ndarray,
                embedder, seen: set[str], min_support: float) -> list[tuple[str, str, str | None]]:
    """Each pair with the first check it fails (None: it passed). `sections[own]` is where it
    comes from; `vectors` are the sections' memory vectors; `seen`: the document's questions so far."""
    out = [(q, a, _first_failure(q, a, sections[own], seen, min_support)) for q, a in pairs]
    passed = [i for i, (_q, _a, why) in enumerate(out) if why is None]
    if passed and len(sections) > 1:
        scores = embedder.embed([out[i][0] for i in passed]) @ vectors.T  # question × section
        for i, row in zip(passed, scores):
            if int(np.argmax(row)) != own:
                out[i] = (out[i][0], out[i][1], OTHER_SECTION)
    return out


def ask_section(client: httpx.Client, section: DocumentSection, settings: DocumentSettings) -> list[tuple[str, str]]:
    """The pairs the model writes for one section (AugmentError: the gateway failed)."""
    body = {"model": settings.docs_questions_model, "temperature": 0.2,
            "max_tokens": TOKENS_PER_PAIR * settings.docs_questions,
            "messages": question_messages(section.title, section.text, settings.docs_questions)}
    return parse_pairs(complete(client, body))[:settings.docs_questions]


def generate_questions(session: Session, client: httpx.Client, embedder, document: Document,
                       settings: DocumentSettings) -> Generation:
    """Ask about each section of `document` not yet asked about in its current text, check the
    pairs and store them (one commit per section, so a stopped run keeps what it did)."""
    todo = sections_to_ask(session, document.id)
    result = Generation(document, left=len(todo))
    if not todo:
        return result
    sections = sections_of(session, document.id, active=True)
    vectors = item_vectors(embedder, [(s.title, s.text) for s in sections])  # as the memory keys them
    place = {s.id: i for i, s in enumerate(sections)}
    seen = {normalize_answer(row.question) for row in current_questions(session, document.id)}
    for section in todo:
        try:
            pairs = ask_section(client, section, settings)
        except (AugmentError, httpx.HTTPError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("question generation stopped", document=document.id, left=result.left, error=result.error)
            break
        result.left, result.asked = result.left - 1, result.asked + 1
        checked = check_pairs(pairs, place[section.id], sections, vectors, embedder, seen,
                              settings.docs_questions_min_support)
        add_questions(session, section, checked)
        result.unanswered += not checked
        result.kept += sum(why is None for _q, _a, why in checked)
        result.filtered.update(why for _q, _a, why in checked if why)
    log.info("questions generated", document=document.id, asked=result.asked, kept=result.kept,
             filtered=sum(result.filtered.values()))
    return result
