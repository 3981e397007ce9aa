"""The correction memory (flywheel/memory.py, store/memory.py): visibility, the three tiers,
citations, the store round trip, imports, and retrieval by meaning with the real embedder."""
from __future__ import annotations

import os
from datetime import datetime, timezone

import numpy as np
import pytest

from flywheel.memory import Memory, MemoryIndex, MemoryPlan, MemorySettings, Recalled, citation, plan
from store.db import session_scope

WHEN = datetime(2026, 11, 20, 9, 30, tzinfo=timezone.utc)


def unit(*xs) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def item(i: int, score: float = 0.0, source: str = "correction", author: str | None = "UALICE01") -> Recalled:
    return Recalled(i, f"question {i}", f"answer {i}", source, author, WHEN, score)


def test_search_sees_only_what_the_asker_may_see():
    index = MemoryIndex()
    index.add(item(1), unit(1, 0, 0))  # taught in public: everywhere
    index.add(item(2), unit(1, 0.1, 0), visible_in="DALICE")  # taught in Alice's DM
    index.add(item(3), unit(0, 1, 0), visible_in="GPRIVATE")
    q = unit(1, 0.1, 0)
    assert [f.id for f in index.search(q, channel="DALICE", k=3)] == [2, 1]
    assert [f.id for f in index.search(q, channel="GPRIVATE", k=3)] == [1, 3]
    assert [f.id for f in index.search(q, channel="CGENERAL", k=3)] == [1]
    assert [f.id for f in index.search(q, channel="DBOB", k=5)] == [1]
    assert index.search(q, channel=None, k=2)[0].score == pytest.approx(float(unit(1, 0, 0) @ q))


def test_plan_tiers_answer_notes_or_nothing():
    s = MemorySettings(memory_answer_threshold=0.75, memory_answer_floor=0.6, memory_answer_margin=0.1,
                       memory_note_threshold=0.55, memory_top_k=2)
    assert plan([item(1, 0.9), item(2, 0.85)], s).direct.id == 1  # strong match: the taught answer
    assert plan([item(1, 0.65), item(2, 0.5)], s).direct.id == 1  # clear winner above the floor
    close = plan([item(1, 0.65), item(2, 0.6)], s)  # two similar facts compete: the model decides
    assert close.direct is None and [n.id for n in close.notes] == [1, 2]
    assert [n.id for n in plan([item(1, 0.58), item(2, 0.3)], s).notes] == [1]
    nothing = plan([item(1, 0.4), item(2, 0.3)], s)
    assert nothing.direct is None and nothing.notes == [] and plan([], s).used == []
    msgs = [{"role": "user", "content": "q"}]
    assert nothing.apply(msgs) is msgs and "answer 1" in close.apply(msgs)[0]["content"]


def test_citations_say_what_the_answer_used():
    assert citation(MemoryPlan()) is None
    assert citation(MemoryPlan(direct=item(1))) == "Answered from a correction by <@UALICE01>, 20 Nov"
    notes = MemoryPlan(notes=[item(1), item(2, source="import", author=None)])
    assert citation(notes) == "Based on a correction by <@UALICE01>, 20 Nov; imported team notes, 20 Nov"


class FakeEmbedder:
    """Deterministic vectors by keyword, so store tests need no model."""

    dims = 3

    def embed_one(self, text: str) -> np.ndarray:
        return unit(1, 0, 0) if "lunch" in text else unit(0, 1, 0)

    def embed(self, texts):
        return np.stack([self.embed_one(t) for t in texts])


def test_store_round_trip_replace_and_refresh(db_url):
    memory = Memory(MemorySettings(), embedder=FakeEmbedder())
    with session_scope() as s:
        memory.remember(s, key="message:1", question="when is lunch?", answer="At noon.", source="correction",
                        author="UALICE01", channel="C1", visible_in=None)
        first = memory.plan_for("lunch time?", channel="C9", session=s)
        assert first.direct.answer == "At noon." and first.direct.author == "UALICE01"
        # a newer correction of the same answer replaces the item; the index picks up the change
        memory.remember(s, key="message:1", question="when is lunch?", answer="At 12:30.", source="correction",
                        author="UBOB0001", channel="C1", visible_in=None)
        assert memory.plan_for("lunch time?", channel="C9", session=s).direct.answer == "At 12:30."
        from store.memory import count_memory, deactivate_memory_item

        assert count_memory(s) == 1 and deactivate_memory_item(s, "message:1")
        assert memory.plan_for("lunch time?", channel="C9", session=s).used == []
    off = Memory(MemorySettings(memory=False), embedder=FakeEmbedder())
    with session_scope() as s:
        assert off.plan_for("lunch time?", channel="C9", session=s).used == []


def test_refresh_without_changes_keeps_the_built_matrix(db_url):
    """The refresh query is `>= since`; the newest row coming back must not rebuild the matrix on
    every question (that rebuild was 10 ms at 10k items)."""
    memory = Memory(MemorySettings(), embedder=FakeEmbedder())
    with session_scope() as s:
        memory.remember(s, key="message:1", question="when is lunch?", answer="At noon.", source="correction",
                        author="UALICE01", channel="C1", visible_in=None)
        memory.plan_for("lunch time?", channel="C9", session=s)
        built = memory.index._matrix
        memory.plan_for("lunch time?", channel="C9", session=s)
        assert memory.index._matrix is built


def real_embedder_dir():
    from flywheel.modelfiles import default_embedder_dir, read_marker

    path = default_embedder_dir().resolve()
    if read_marker(path) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing in CI; `make model` should have fetched it")
        pytest.skip("sentence embedder not fetched: run `make model`")
    return path


def test_imports_join_the_memory_and_paraphrases_find_them(sqlite_url, tmp_path):
    from trainer.importer import import_file

    real_embedder_dir()
    faq = tmp_path / "faq.jsonl"
    faq.write_text('{"question": "Who founded Lumenfold?", "answer": "Priya Okafor founded Lumenfold in 2019."}\n'
                   '{"question": "Where is the Lumenfold warehouse?", "answer": "The warehouse is in Tartu."}\n'
                   '{"text": "my invoice is wrong", "label": "billing"}\n')
    memory = Memory()
    with session_scope() as s:
        result = import_file(s, faq, memory=memory)
        assert result.remembered == 2  # labels are not answers
        found = memory.plan_for("Which person started Lumenfold?", channel="DANYONE", session=s)
        assert found.used and found.used[0].answer == "Priya Okafor founded Lumenfold in 2019."
        assert found.used[0].source == "import"
        general = memory.plan_for("What is the capital of France?", channel="DANYONE", session=s)
        assert general.used == []  # unrelated questions get no team notes
