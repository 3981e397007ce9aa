"""Training rows that carry retrieved notes in their prompt, so the adapter learns what
production asks of it when the memory offers notes (flywheel.memory's middle tier): use the note
that answers the question, and ignore notes that do not apply. Without the second half an
adapter trained on notes copies whatever note it is given (measured: general questions went
from 5/8 right to 0/8), so never-taught and general rows get unrelated notes and keep their
usual answer."""
from __future__ import annotations

import hashlib

from flywheel.memory import Recalled, search_k
from flywheel.prompt import question_of
from trainer.dataset import TAUGHT_SOURCES


def _taught(row: dict) -> bool:
    return row["label"] is None and (row["source"] in TAUGHT_SOURCES or row["golden"])


def _order(key: str, notes: list[Recalled]) -> list[Recalled]:
    """A fixed shuffle (by the question), so the right note is not always first."""
    flip = hashlib.sha256(key.encode()).digest()[0] % 2
    return list(reversed(notes)) if flip else notes


def noted_rows(rows: list[dict], memory) -> list[dict]:
    """Extra rows with notes: each taught answer asked in its trained paraphrases (worded unlike
    the note, as at serving) with its own note and the nearest other one; each never-taught
    answer with the nearest (unrelated) notes."""
    from flywheel.memory import MemoryPlan

    if memory is None or not len(memory.index):
        return []
    chosen = [r for r in rows if r["label"] is None and (
        (_taught(r) and r["augmented"] and r.get("parent") is not None) or (not _taught(r) and not r["augmented"]))]
    if not chosen:
        return []
    k = search_k(memory.settings)
    vectors = memory.embedder.embed([question_of(r["messages"]) for r in chosen])
    out = []
    for row, vector in zip(chosen, vectors):
        found = memory.index.search(vector, channel=None, k=k + 1)
        if _taught(row):
            own = [f for f in found if f.answer == row["answer"]]
            others = [f for f in found if f.answer != row["answer"]]
            if not own:
                continue
            notes = [own[0], *others[:k - 1]]
        else:
            notes = [f for f in found if f.answer != row["answer"]][:k]
        if not notes:
            continue
        plan = MemoryPlan(notes=_order(question_of(row["messages"]), notes))
        out.append({**row, "messages": plan.apply(row["messages"]), "augmented": True, "noted": True})
    return out
