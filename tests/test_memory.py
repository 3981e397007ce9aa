"""The correction memory (flywheel/memory.py, store/memory.py): visibility, the three tiers,
citations, the store round trip, imports, and retrieval by meaning with the real embedder.

The searches run against each kind of store: the in-process index (SQLite, and a PostgreSQL
without pgvector) and the search in the database (PostgreSQL with pgvector, migration 0006)."""
from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from alembic import command
from sqlalchemy import inspect, text

from flywheel.embedding import DIMS, to_bytes
from flywheel.memory import (
    DatabaseSearch,
    Memory,
    MemoryIndex,
    MemoryPlan,
    MemorySettings,
    Recalled,
    citation,
    item_vectors,
    plan,
)
from store.db import get_engine, session_scope
from store.memory import memory_changed_after, memory_search_query, upsert_memory_item, vector_search
from store.migrate import alembic_config, check_drift, upgrade

WHEN = datetime(2026, 11, 20, 9, 30, tzinfo=timezone.utc)
# the database search through its HNSW index even where the planner would scan a table this small
INDEX_ONLY = "?options=-c%20enable_seqscan%3Doff%20-c%20enable_bitmapscan%3Doff"


def unit(*xs) -> np.ndarray:
    """A unit vector of the embedder's dimension with these first components."""
    v = np.zeros(DIMS, dtype=np.float32)
    v[:len(xs)] = xs
    return v / np.linalg.norm(v)


def item(i: int, score: float = 0.0, source: str = "correction", author: str | None = "UALICE01") -> Recalled:
    return Recalled(i, f"question {i}", f"answer {i}", source, author, WHEN, score)


@pytest.fixture
def memory_db_url(request, tmp_path, monkeypatch):
    """A migrated database of each kind the memory searches differently (see the module's doc)."""
    kind = request.param
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'flywheel.db'}"
    else:
        url = request.getfixturevalue("pg_server" if kind == "postgresql" else "pgvector_server").create_database()
    upgrade(url)
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
    yield url
    get_engine(url).dispose()


STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres),
          pytest.param("pgvector", marks=pytest.mark.postgres)]
stores = pytest.mark.parametrize("memory_db_url", STORES, indirect=True)


@pytest.fixture(params=["process", pytest.param("database", marks=pytest.mark.postgres)])
def searcher(request):
    """Builds one search over (item, vector, visible_in) triples: the in-process index, or the
    database's (the items written through the store, searched through the HNSW index)."""
    if request.param == "process":
        def build(items):
            index = MemoryIndex()
            for it, vec, vis in items:
                index.add(it, vec, visible_in=vis)
            return index

        yield build
        return
    url = request.getfixturevalue("pgvector_server").create_database() + INDEX_ONLY
    upgrade(url)
    with session_scope(get_engine(url)) as s:
        def build(items):
            for it, vec, vis in items:  # in id order into a fresh table: the store's ids are the items'
                row = upsert_memory_item(s, key=f"item:{it.id}", question=it.question, answer=it.answer,
                                         source=it.source, author=it.author, channel=vis, visible_in=vis,
                                         vector=to_bytes(vec))
                assert row.id == it.id
            return DatabaseSearch(s, MemorySettings().memory_ef_search)

        yield build
    get_engine(url).dispose()


def test_search_sees_only_what_the_asker_may_see(searcher):
    index = searcher([(item(1), unit(1, 0, 0), None),  # taught in public: everywhere
                      (item(2), unit(1, 0.1, 0), "DALICE"),  # taught in Alice's DM
                      (item(3), unit(0, 1, 0), "GPRIVATE")])
    q = unit(1, 0.1, 0)
    assert [f.id for f in index.search(q, channel="DALICE", k=3)] == [2, 1]
    assert [f.id for f in index.search(q, channel="GPRIVATE", k=3)] == [1, 3]
    assert [f.id for f in index.search(q, channel="CGENERAL", k=3)] == [1]
    assert [f.id for f in index.search(q, channel="DBOB", k=5)] == [1]
    assert index.search(q, channel=None, k=2)[0].score == pytest.approx(float(unit(1, 0, 0) @ q))


def test_both_searches_give_the_same_scored_items(searcher):
    """Items keyed as the memory keys them (means of two unit vectors, shorter than one): ranked
    and scored by inner product, as the in-process index does; private items stay private even
    when they are the nearest ones (the database search scans on past them)."""
    rng = np.random.default_rng(7)
    vectors = ((unit(*rng.standard_normal(DIMS)) + unit(*rng.standard_normal(DIMS))) / 2 for _ in range(60))
    items = [(item(i + 1), v.astype(np.float32), "DSECRET" if i % 3 == 0 else None) for i, v in enumerate(vectors)]
    index = searcher(items)
    exact = MemoryIndex()
    for it, vec, vis in items:
        exact.add(it, vec, visible_in=vis)
    for q in (unit(*rng.standard_normal(DIMS)) for _ in range(10)):
        for channel in ("CGENERAL", "DSECRET", None):
            got, want = index.search(q, channel=channel, k=3), exact.search(q, channel=channel, k=3)
            assert [f.id for f in got] == [f.id for f in want]
            assert [f.score for f in got] == pytest.approx([f.score for f in want], abs=1e-5)
            assert all(f.question == f"question {f.id}" and f.created_at.tzinfo for f in got)


def test_the_database_search_scans_past_private_neighbours(pgvector_server):
    """Forty items in one DM sit nearest the question, one public item far away: the asker in
    another channel still gets the public one through the index (pgvector's iterative scan)."""
    url = pgvector_server.create_database() + INDEX_ONLY
    upgrade(url)
    with session_scope(get_engine(url)) as s:
        for i in range(40):
            upsert_memory_item(s, key=f"dm:{i}", question=f"q{i}", answer="a", source="correction", author=None,
                               channel="DSECRET", visible_in="DSECRET", vector=to_bytes(unit(1, 0.01 * i, 0)))
        upsert_memory_item(s, key="public", question="public", answer="a", source="import", author=None,
                           channel=None, visible_in=None, vector=to_bytes(unit(0, 1, 0.5)))
        q = unit(1, 0, 0)  # no ANALYZE: with statistics the planner rightly sorts 41 rows itself
        compiled = memory_search_query(q, channel="CPUBLIC", k=2).compile(
            dialect=s.get_bind().dialect, compile_kwargs={"literal_binds": True})
        assert "ix_memoryitem_embedding" in " ".join(r[0] for r in s.execute(text(f"EXPLAIN {compiled}")))
        found = DatabaseSearch(s, ef_search=10).search(q, channel="CPUBLIC", k=2)
        assert [f.question for f in found] == ["public"]
        assert len(DatabaseSearch(s, ef_search=10).search(q, channel="DSECRET", k=5)) == 5
    get_engine(url).dispose()


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

    dims = DIMS

    def embed_one(self, text: str) -> np.ndarray:
        return unit(1, 0, 0) if "lunch" in text else unit(0, 1, 0)

    def embed(self, texts):
        return np.stack([self.embed_one(t) for t in texts])


@stores
def test_store_round_trip_replace_and_refresh(memory_db_url):
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


def test_an_item_from_a_writer_whose_clock_runs_behind_is_seen_at_the_next_refresh(db_url, monkeypatch):
    """Readers refresh by the database's change numbers, not a host's clock: a correction
    re-taught by a host an hour behind (its updated_at older than everything the reader has
    seen) reaches the reader's index at once (issue 25.7; by `updated_at >= since` the old
    answer stayed until a restart)."""
    memory = Memory(MemorySettings(), embedder=FakeEmbedder())
    with session_scope() as s:
        memory.remember(s, key="message:1", question="when is lunch?", answer="At noon.", source="correction",
                        author="UALICE01", channel="C1", visible_in=None)
        memory.index.refresh(s)
        assert len(memory.index) == 1
    behind = datetime.now(timezone.utc) - timedelta(hours=1)
    monkeypatch.setattr("store.memory.utcnow", lambda: behind)
    with session_scope() as s:
        memory.remember(s, key="message:1", question="when is lunch?", answer="At one.", source="correction",
                        author="UBOB0001", channel="C1", visible_in=None)
        memory.index.refresh(s)
        assert [row[0].answer for row in memory.index._rows.values()] == ["At one."]


def test_refresh_without_changes_keeps_the_built_matrix(db_url):
    """A refresh that finds no change must not rebuild the matrix on every question (that rebuild
    was 10 ms at 10k items)."""
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


@stores
def test_imports_join_the_memory_and_paraphrases_find_them(memory_db_url, tmp_path):
    from trainer.importer import import_file

    real_embedder_dir()
    faq = tmp_path / "faq.jsonl"
    faq.write_text('{"question": "Who founded Lumenfold?", "answer": "Priya Okafor founded Lumenfold in 2019."}\n'
                   '{"question": "Where is the Lumenfold warehouse?", "answer": "The warehouse is in Tartu."}\n'
                   '{"text": "my invoice is wrong", "label": "billing"}\n')
    memory = Memory(MemorySettings())
    with session_scope() as s:
        result = import_file(s, faq, memory=memory)
        assert result.remembered == 2  # labels are not answers
        found = memory.plan_for("Which person started Lumenfold?", channel="DANYONE", session=s)
        assert found.used and found.used[0].answer == "Priya Okafor founded Lumenfold in 2019."
        assert found.used[0].source == "import"
        general = memory.plan_for("What is the capital of France?", channel="DANYONE", session=s)
        assert general.used == []  # unrelated questions get no team notes


@stores
def test_the_memory_searches_where_the_store_can(memory_db_url, request):
    """pgvector: the search runs in the database and the process holds no items; elsewhere the
    in-process index holds them."""
    in_database = request.node.callspec.params["memory_db_url"] == "pgvector"
    memory = Memory(MemorySettings(), embedder=FakeEmbedder())
    with session_scope() as s:
        memory.remember(s, key="message:1", question="when is lunch?", answer="At noon.", source="correction",
                        author="UALICE01", channel="C1", visible_in=None)
        assert memory.plan_for("lunch time?", channel="C9", session=s).direct.answer == "At noon."
        assert (vector_search(s) is not None) == in_database
        assert len(memory.index) == (0 if in_database else 1)


class ShortEmbedder(FakeEmbedder):
    """Another embedder's dimension than the database's vector column."""

    dims = 3

    def embed_one(self, text: str) -> np.ndarray:
        return super().embed_one(text)[:3]


def test_another_embedders_dimension_falls_back_to_the_in_process_search(pgvector_server, monkeypatch):
    url = pgvector_server.create_database()
    upgrade(url)
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
    memory = Memory(MemorySettings(), embedder=ShortEmbedder())
    with session_scope() as s:
        memory.remember(s, key="message:1", question="when is lunch?", answer="At noon.", source="correction",
                        author="UALICE01", channel="C1", visible_in=None)
        assert memory.plan_for("lunch time?", channel="C9", session=s).direct.answer == "At noon."
        assert len(memory.index) == 1
        assert s.execute(text("SELECT embedding FROM memoryitem")).scalar_one() is None


@stores
def test_migration_adds_the_vector_search_only_where_pgvector_is(memory_db_url, request, capsys):
    with_pgvector = request.node.callspec.params["memory_db_url"] == "pgvector"
    columns = {c["name"] for c in inspect(get_engine(memory_db_url)).get_columns("memoryitem")}
    assert "vector" in columns and ("embedding" in columns) == with_pgvector  # the bytes stay everywhere
    check_drift(memory_db_url)  # the unmapped column and its index are no drift
    command.downgrade(alembic_config(memory_db_url), "0005")
    capsys.readouterr()
    upgrade(memory_db_url)
    said = capsys.readouterr().err
    assert ("memory search in the database" if with_pgvector else "memory search stays in process") in said


def test_migration_fills_the_vector_column_from_existing_items(pgvector_server):
    """Items stored before 0006 keep their bytes and get their vectors, and (0008) change
    numbers in the order they changed; a downgrade drops only the database search."""
    url = pgvector_server.create_database()
    upgrade(url, "0005")
    vectors = item_vectors(FakeEmbedder(), [("when is lunch?", "At noon."), ("where?", "Tartu")])
    with get_engine(url).begin() as conn:  # as the code of that time wrote them; q1 changed first
        for i, v in enumerate(vectors):
            conn.execute(text("INSERT INTO memoryitem (key, question, answer, source, vector, active, created_at, "
                              "updated_at) VALUES (:k, :q, 'a', 'import', :v, true, :t, :t)"),
                         {"k": f"k{i}", "q": f"q{i}", "v": to_bytes(v), "t": datetime(2026, 1, 2 - i, tzinfo=timezone.utc)})
    upgrade(url)
    with session_scope(get_engine(url)) as s:
        assert [(r.question, r.change_seq) for r in memory_changed_after(s, 0)] == [("q1", 1), ("q0", 2)]
        upsert_memory_item(s, key="k2", question="q2", answer="a", source="import", author=None,
                           channel=None, visible_in=None, vector=to_bytes(-vectors[0]))  # found last
        assert [r.change_seq for r in memory_changed_after(s, 2)] == [3]
        search = vector_search(s)
        assert search is not None and search.dims == DIMS
        found = DatabaseSearch(s, ef_search=40).search(vectors[1], channel=None, k=2)
        assert [f.question for f in found] == ["q1", "q0"]
        assert found[0].score == pytest.approx(float(vectors[1] @ vectors[1]), abs=1e-5)
    command.downgrade(alembic_config(url), "0005")
    assert "embedding" not in {c["name"] for c in inspect(get_engine(url)).get_columns("memoryitem")}
    get_engine(url).dispose()
