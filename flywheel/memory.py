"""Correction memory: what the team taught, found by meaning when a question comes in, so a
correction helps the very next asker instead of waiting for a retrain, a gate and an approval.

The plan for one question has three tiers, by the best cosine similarity among the items the
asker may see:
- at or above `memory_answer_threshold`: the taught answer itself, cited (a question the team
  already answered, reworded);
- at or above `memory_note_threshold`: the top-k items go into the prompt as notes and the model
  answers (it may use them or not);
- below: the model answers as it would without memory.
The bot, the evaluator and the demo all plan with `plan()` here, so the gate scores what users
get. Vectors live in the store. Two searches behind one interface (`search(vector, channel=, k=)`,
the same scored items, best first):
- `MemoryIndex`: brute-force inner product in numpy over an in-process matrix refreshed from the
  rows changed since the last look (SQLite, a PostgreSQL without pgvector, the evaluator's items;
  bench/memory: search p95 4 ms at 10k items on an idle 2-core EPYC);
- `DatabaseSearch`: on PostgreSQL with pgvector (migration 0006) the search runs in the database
  by an HNSW index, nothing held in the process (bench/memory: 1M items, recall@2 0.92 at
  p95 32 ms with the default ef_search; bench/memory/results.json).
`Memory` picks the database's search when the store has one, else the in-process index."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlmodel import Session

from flywheel.embedding import from_bytes, load_embedder, to_bytes
from flywheel.logs import get_logger
from flywheel.mrkdwn import escape
from flywheel.prompt import with_notes
from flywheel.redact import redact
from store.memory import (
    has_memory,
    memory_changed_after,
    search_memory,
    upsert_memory_item,
    vector_search,
)
from store.models import SECTION_SOURCE

log = get_logger("flywheel.memory")


class MemorySettings(BaseSettings):
    """FLYWHEEL_MEMORY=0 turns the memory off everywhere (bot, evaluation, demo)."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    memory: bool = True
    embed_model: str = "models/all-minilm-l6-v2"
    memory_top_k: int = Field(default=2, ge=1, le=10)
    # Calibrated on five fact sets (bench/learning/calibrate.py; README "Correction memory"):
    # answer from the memory at ≥ 0.75, or at ≥ 0.60 when the best item leads the next by 0.10
    # (similar facts of one team compete; a clear winner is rarely wrong); notes from 0.35: an
    # adapter trained with notes used them (demo paraphrases 0.87 → 0.92 token F1 going from 0.55
    # to 0.35) and general questions were answered as well with notes as without.
    memory_answer_threshold: float = Field(default=0.75, gt=0.0, le=1.0)
    memory_answer_floor: float = Field(default=0.60, gt=0.0, le=1.0)
    memory_answer_margin: float = Field(default=0.10, ge=0.0, le=1.0)
    memory_note_threshold: float = Field(default=0.35, gt=0.0, le=1.0)
    # PostgreSQL with pgvector: HNSW candidates per question (hnsw.ef_search). bench/memory/run.py,
    # recall@2 against the exact search: 1M items 0.92 at 100 (p95 32 ms), 0.95 at 250 (p95 67 ms);
    # 100k items 0.995 at 100
    memory_ef_search: int = Field(default=100, ge=1, le=1000)


@dataclass(frozen=True)
class Recalled:
    """One memory item retrieved for a question."""

    id: int
    question: str
    answer: str
    source: str
    author: str | None
    created_at: datetime
    score: float


@dataclass
class MemoryPlan:
    direct: Recalled | None = None  # answer with this item itself
    notes: list[Recalled] = field(default_factory=list)  # or give these to the model

    @property
    def used(self) -> list[Recalled]:
        return [self.direct] if self.direct else self.notes

    def apply(self, messages: list[dict]) -> list[dict]:
        """The prompt with the notes (unchanged when there are none): taught answers as questions
        and answers, document sections under their title path."""
        return with_notes(messages, [(n.question, n.answer) for n in self.notes if n.source != SECTION_SOURCE],
                          [(n.question, n.answer) for n in self.notes if n.source == SECTION_SOURCE])


class MemoryIndex:
    """The active items as one matrix; `refresh` pulls only rows changed since the last call."""

    def __init__(self) -> None:
        self._rows: dict[int, tuple] = {}  # id → (Recalled without score, visible_in, vector)
        self._after = 0  # the last change number applied (store.memory.next_change)
        self._matrix = np.zeros((0, 0), dtype=np.float32)
        self._meta: list[Recalled] = []
        self._scope = np.zeros(0, dtype=np.int32)  # 0: everywhere, else the code of its channel
        self._codes: dict[str, int] = {}
        self._dirty = False
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def refresh(self, session: Session) -> None:
        changed = memory_changed_after(session, self._after)
        with self._lock:
            for row in changed:
                self._after = max(self._after, row.change_seq)
                if not row.active:
                    self._dirty |= self._rows.pop(row.id, None) is not None
                    continue
                item = Recalled(row.id, row.question, row.answer, row.source, row.author, row.created_at, 0.0)
                self._rows[row.id] = (item, row.visible_in, from_bytes(row.vector))
                self._dirty = True

    def add(self, item: Recalled, vector: np.ndarray, visible_in: str | None = None) -> None:
        """An item that is not (or not yet) in the store: the evaluator's and the benchmark's."""
        with self._lock:
            self._rows[item.id] = (item, visible_in, np.asarray(vector, dtype=np.float32))
            self._dirty = True

    def _build(self) -> None:
        if not self._dirty:
            return
        self._meta = [item for item, _, _ in self._rows.values()]
        self._codes = {}
        scope = [0 if vis is None else self._codes.setdefault(vis, len(self._codes) + 1)
                 for _, vis, _ in self._rows.values()]
        self._scope = np.array(scope, dtype=np.int32)
        vectors = [vec for _, _, vec in self._rows.values()]
        self._matrix = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
        self._dirty = False

    def search(self, vector: np.ndarray, *, channel: str | None, k: int) -> list[Recalled]:
        """The k most similar items visible in `channel`, best first."""
        with self._lock:
            self._build()
            if not self._meta:
                return []
            scores = self._matrix @ np.asarray(vector, dtype=np.float32)
            own = self._codes.get(channel or "", -1)
            scores = np.where((self._scope == 0) | (self._scope == own), scores, -2.0)
            k = min(k, len(scores))
            top = np.argpartition(-scores, k - 1)[:k]
            top = top[np.argsort(-scores[top])]
            return [_scored(self._meta[i], float(scores[i])) for i in top if scores[i] > -2.0]


class DatabaseSearch:
    """The same search inside PostgreSQL (pgvector's HNSW index over the active items, migration
    0006), in the asker's session: approximate, `ef_search` candidates looked at."""

    def __init__(self, session: Session, ef_search: int) -> None:
        self._session = session
        self._ef_search = ef_search

    def search(self, vector: np.ndarray, *, channel: str | None, k: int) -> list[Recalled]:
        """The k most similar items visible in `channel`, best first."""
        rows = search_memory(self._session, vector, channel=channel, k=k, ef_search=self._ef_search)
        return [Recalled(*row[:6], float(row[6])) for row in rows]


def _scored(item: Recalled, score: float) -> Recalled:
    return Recalled(item.id, item.question, item.answer, item.source, item.author, item.created_at, score)


def plan(found: list[Recalled], settings: MemorySettings) -> MemoryPlan:
    """The tier for a question, from its retrieved items (best first, at least two asked for). A
    document's section is never the answer itself (it says more than the question asks): only a
    note."""
    if not found:
        return MemoryPlan()
    best = found[0].score
    lead = best - (found[1].score if len(found) > 1 else 0.0)
    if found[0].source != SECTION_SOURCE and (best >= settings.memory_answer_threshold or (
            best >= settings.memory_answer_floor and lead >= settings.memory_answer_margin)):
        return MemoryPlan(direct=found[0])
    notes = [f for f in found if f.score >= settings.memory_note_threshold]
    return MemoryPlan(notes=notes[:settings.memory_top_k])


def item_vectors(embedder, pairs: list[tuple[str, str]]) -> np.ndarray:
    """How an item is keyed: the mean of its question's vector and its question + answer's vector
    (not renormalized), so a question's score is the mean of both cosines. The question alone
    matches rewordings of the question; with the answer it also matches questions worded like
    the answer ("who's the top vet?" → "… is the clinical director"). bench/learning/calibrate.py
    measured the top-1 right share go 0.73 → 0.77 (clinic), 0.73 → 0.79 (logistics), 0.86 → 0.89
    (bundled) at unchanged thresholds, with no general question answered from the memory."""
    if not pairs:
        return np.zeros((0, 0), dtype=np.float32)
    both = embedder.embed([q for q, _ in pairs] + [f"{q}\n{a}" for q, a in pairs])  # one batch
    return ((both[:len(pairs)] + both[len(pairs):]) / 2).astype(np.float32)


def search_k(settings: MemorySettings) -> int:
    """Items to retrieve: the notes' top-k, and at least two to see the best one's lead."""
    return max(2, settings.memory_top_k)


class Memory:
    """The memory as one service: embedder + index + settings (bot and evaluator use it)."""

    def __init__(self, settings: MemorySettings, embedder=None) -> None:
        self.settings = settings
        self._embedder = embedder
        self.index = MemoryIndex()
        self._where: str | None = None  # where the last search ran ("database" / "process"), logged on change

    @property
    def embedder(self):
        if self._embedder is None:  # loaded on first use (the module is light; the model is not)
            self._embedder = load_embedder(self.settings.embed_model)
        return self._embedder

    def warm(self) -> None:
        """Load the embedder now (in the background at start-up) rather than on the first question."""
        if not self.settings.memory:
            return
        try:
            self.embedder
        except Exception as exc:  # answering goes on without the memory; each use logs why
            log.warning("memory unavailable", error=f"{type(exc).__name__}: {exc}")

    def plan_for(self, question: str, *, channel: str | None, session: Session | None = None) -> MemoryPlan:
        if not self.settings.memory or not question.strip():
            return MemoryPlan()
        index = self._index(session)
        if index is None:
            return MemoryPlan()
        found = index.search(self.embedder.embed_one(question), channel=channel, k=search_k(self.settings))
        return plan(found, self.settings)

    def _index(self, session: Session | None) -> MemoryIndex | DatabaseSearch | None:
        """Where to search: the database when it can (its vector column of the embedder's
        dimension), else the in-process index; None when there is nothing to find."""
        if session is None:
            return self.index if len(self.index) else None
        search, why = vector_search(session), {}
        if search is not None:
            if not has_memory(session):
                return None
            if search.dims == self.embedder.dims:
                self._searching("database", index="hnsw", ef_search=self.settings.memory_ef_search)
                return DatabaseSearch(session, self.settings.memory_ef_search)
            why = {"reason": f"the database's vectors have {search.dims} dimensions, "
                             f"the embedder's {self.embedder.dims}"}
        self._searching("process", **why)
        self.index.refresh(session)
        return self.index if len(self.index) else None

    def _searching(self, where: str, **why) -> None:
        if self._where != where:
            self._where = where
            log.info("memory search", where=where, **why)

    def remember(self, session: Session, *, key: str, question: str, answer: str, source: str,
                 author: str | None, channel: str | None, visible_in: str | None):
        """Store (or replace) one taught item with its vector, redacted as training data is (a
        secret or a phone number in a correction is neither kept nor embedded)."""
        question, answer = redact(question), redact(answer)
        vector = item_vectors(self.embedder, [(question, answer)])[0]
        return upsert_memory_item(session, key=key, question=question, answer=answer, source=source,
                                  author=author, channel=channel, visible_in=visible_in,
                                  vector=to_bytes(vector))


def citation(plan: MemoryPlan) -> str | None:
    """'Based on a correction by <@U1>, 20 Nov' under an answer that used the memory; 'From
    *Onboarding › Laptops*, imported 2 Dec' for a document's section."""
    if not plan.used:
        return None
    sections = [f"*{_mrkdwn(item.question)}*, imported {item.created_at.day} {item.created_at:%b}"
                for item in plan.used if item.source == SECTION_SOURCE]
    taught = [item for item in plan.used if item.source != SECTION_SOURCE]
    cited = _taught_citation(taught, direct=plan.direct is not None) if taught else None
    return "; ".join(filter(None, [cited, "From " + "; ".join(sections) if sections else None]))


def _mrkdwn(text: str) -> str:
    """Text safe inside Slack mrkdwn: its three control characters escaped, no stray bold."""
    return escape(text).replace("*", "")


def _taught_citation(items: list[Recalled], *, direct: bool) -> str:
    parts = []
    for item in items:
        kind = {"correction": "a correction", "golden": "a golden answer", "import": "imported team notes"}.get(
            item.source, item.source)
        who = f" by <@{item.author}>" if item.author and item.source != "import" else ""
        parts.append(f"{kind}{who}, {item.created_at.day} {item.created_at:%b}")
    verb = "Answered from" if direct else "Based on"
    return f"{verb} " + "; ".join(parts)
