"""Dataset building: cleaning, redaction, import, feedback targets, dedup, split, snapshots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from flywheel.redact import redact
from store.conversations import record_message
from store.db import get_engine, session_scope
from store.examples import list_examples, upsert_example
from store.feedback import retract_vote, upsert_vote
from store.models import ExampleStatus
from trainer.dataset import build_snapshot, hash_split
from trainer.importer import ImportFileError, import_file
from trainer.settings import TrainerSettings
from trainer.targets import derive_examples

DATA = Path(__file__).parent / "data"
ADMINS = frozenset({"U9"})  # FLYWHEEL_ADMINS as the trainer reads it


@pytest.fixture
def sq(sqlite_url):
    with session_scope(get_engine(sqlite_url)) as s:
        yield s


def settings(tmp_path, **kw) -> TrainerSettings:
    return TrainerSettings(data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad", **kw)


@pytest.mark.parametrize("raw, expected", [
    ("mail jane.doe@example.org now", "mail [EMAIL] now"),
    ("call +49 30 1234 5678 or (555) 123-4567", "call [PHONE] or [PHONE]"),
    ("token xoxb-1234567890-abcdefghij and xapp-1-A0-123-abcdef", "token [SLACK_TOKEN] and [SLACK_TOKEN]"),
    ("key sk-proj-AbCdEf0123456789xyz", "key [API_KEY]"),
    ("aws AKIAIOSFODNN7EXAMPLE", "aws [AWS_KEY]"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY1", "aws_secret_access_key = [AWS_KEY]"),
    ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
    ("host 192.168.10.7 and fe80::1ff:fe23:4567:890a", "host [IP] and [IP]"),
])
def test_redaction_replaces_with_typed_placeholders(raw, expected):
    assert redact(raw) == expected


@pytest.mark.parametrize("keep", [
    "released on 2024-11-29 at 10:30:45", "order 12345 costs 18,400 euros", "card-like 4111 1111 1111 1112",
    "version 2.5 and route a::b",
])
def test_redaction_leaves_ordinary_text(keep):
    assert redact(keep) == keep


def test_import_jsonl_and_csv(sq, tmp_path):
    r1 = import_file(sq, DATA / "faq.jsonl")
    r2 = import_file(sq, DATA / "tickets.csv")
    assert (r1.created, r2.created) == (20, 9)
    again = import_file(sq, DATA / "faq.jsonl")
    assert (again.created, again.existing) == (0, 20)
    rows = list_examples(sq)
    assert len(rows) == 29 and {r.source for r in rows} == {"import"}
    labels = {r.label for r in rows if r.label}
    assert labels == {"billing", "bug", "feature"}
    assert rows[0].provenance == {"file": "faq.jsonl", "line": 1}


def test_import_rejects_bad_files_whole(sq, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok?", "answer": "yes"}\n{"question": "no answer"}\nnot json\n')
    with pytest.raises(ImportFileError) as err:
        import_file(sq, bad)
    assert "line 3: invalid JSON" in str(err.value)
    bad.write_text('{"question": "ok?", "answer": "yes"}\n{"question": "no answer"}\n')
    with pytest.raises(ImportFileError, match=r"line 2: needs 'question' and 'answer'"):
        import_file(sq, bad)
    assert list_examples(sq) == []  # nothing half-imported
    with pytest.raises(ImportFileError, match="unsupported file type"):
        (tmp_path / "x.xml").write_text("<a/>")
        import_file(sq, tmp_path / "x.xml")
    with pytest.raises(ImportFileError, match="no such file"):
        import_file(sq, tmp_path / "missing.csv")


class Thread:
    """A Slack thread in the store: a question and the bot's answer, plus votes on it."""

    n = 0

    def __init__(self, s, question: str, answer: str):
        Thread.n += 1
        self.s, self.ts = s, f"{1700000000 + Thread.n * 10}.000100"
        self.q = record_message(s, channel="C1", ts=self.ts, thread_ts=None, role="user", text=question, author="U1")
        self.a = record_message(s, channel="C1", ts=f"{1700000000 + Thread.n * 10 + 1}.000100", thread_ts=self.ts,
                                role="assistant", text=answer, model_version="base", latency_ms=12.0)

    def vote(self, user, value, kind="reaction", admin=False, correction=None, on=None):
        return upsert_vote(self.s, message_id=(on or self.a).id, user=user, kind=kind, value=value,
                           correction=correction, is_admin=admin)


def _by_question(s):
    return {ex.messages[-1]["content"]: ex for ex in list_examples(s)}


def test_feedback_target_rules(session):
    s = session
    up = Thread(s, "<@UBOT> what is the wifi password?", "It is on the fridge.")
    up.vote("U2", "up"); up.vote("U3", "up", kind="button"); up.vote("U4", "down")
    down = Thread(s, "who owns the cat?", "The dog does.")
    down.vote("U2", "down")
    corrected = Thread(s, "when is lunch?", "Never.")
    corrected.vote("U2", "down"); corrected.vote("U2", "correction", kind="correction", correction="At 12:30.")
    corrected.vote("U9", "correction", kind="correction", correction="At noon.", admin=True)
    admin_wins = Thread(s, "is the office open on sunday?", "Yes.")
    admin_wins.vote("U2", "up"); admin_wins.vote("U3", "up"); admin_wins.vote("U9", "down", admin=True)
    mixed = Thread(s, "what colour is the logo?", "Blue.")
    mixed.vote("U2", "up"); mixed.vote("U3", "down")
    golden = Thread(s, "where is the main office?", "In Tallinn.")
    golden.vote("U9", "golden", kind="golden", admin=True)
    shortcut = Thread(s, "how do I book a room?", "Use the room calendar.")
    shortcut.vote("U5", "include", kind="shortcut", on=shortcut.q)
    labeled = Thread(s, "my invoice is wrong", "Sorry about that.")
    labeled.vote("U2", "bug", kind="label"); labeled.vote("U3", "bug", kind="label")
    labeled.vote("U9", "billing", kind="label", admin=True)

    result = derive_examples(s, admins=ADMINS)
    ex = _by_question(s)
    assert ex["<@UBOT> what is the wifi password?"].answer == "It is on the fridge."
    assert ex["<@UBOT> what is the wifi password?"].source == "feedback"
    # voted down, nothing better taught: kept only as an undesirable answer (KTO), never as a target
    cat = ex["who owns the cat?"]
    assert (cat.answer, cat.label, cat.rejected_answer, cat.source) == (None, None, "The dog does.", "rejected")
    assert result.rejected_only == 2  # the cat and the admin's 👎
    lunch = ex["when is lunch?"]
    # a user's 👎 + correction teaches the answer but never makes a golden item: only admins do
    assert (lunch.answer, lunch.source, lunch.rejected_answer, lunch.golden) == ("At noon.", "correction", "Never.", False)
    assert sorted(lunch.provenance["feedback_ids"]) == lunch.provenance["feedback_ids"] and len(lunch.provenance["feedback_ids"]) == 3
    assert ex["is the office open on sunday?"].source == "rejected" and "what colour is the logo?" not in ex
    assert ex["where is the main office?"].golden and ex["where is the main office?"].answer == "In Tallinn."
    assert ex["how do I book a room?"].answer == "Use the room calendar."
    label_rows = [e for e in list_examples(s) if e.label]
    assert [(e.messages[-1]["content"], e.label) for e in label_rows] == [("my invoice is wrong", "billing")]

    # An apology (the bot failed) is not an answer the model gave: a 👎 on it is no preference
    # signal, and a correction under it teaches the answer without a pair.
    Thread.n += 1
    q = record_message(s, channel="C1", ts=f"{1700000000 + Thread.n * 10}.000100", thread_ts=None, role="user",
                       text="what is the vpn address?", author="U1")
    sorry = record_message(s, channel="C1", ts=f"{1700000000 + Thread.n * 10 + 1}.000100", thread_ts=q.ts,
                           role="assistant", text="Sorry, I could not answer that.", error="deadline")
    upsert_vote(s, message_id=sorry.id, user="U2", kind="reaction", value="down")
    derive_examples(s, admins=ADMINS)
    assert "what is the vpn address?" not in _by_question(s)
    upsert_vote(s, message_id=sorry.id, user="U2", kind="correction", value="correction", correction="vpn.example.org")
    derive_examples(s, admins=ADMINS)
    vpn = _by_question(s)["what is the vpn address?"]
    assert (vpn.source, vpn.answer, vpn.rejected_answer) == ("correction", "vpn.example.org", None)

    # A correction arriving later supersedes the bare 👎: the rejected-only item is excluded.
    down.vote("U3", "correction", kind="correction", correction="Nobody owns the cat.")
    derive_examples(s, admins=ADMINS)
    active = [e for e in list_examples(s, status=ExampleStatus.active) if e.messages[-1]["content"] == "who owns the cat?"]
    assert [(e.source, e.answer, e.rejected_answer) for e in active] == [("correction", "Nobody owns the cat.", "The dog does.")]

    # Retracting the votes that made a target excludes the example on the next build.
    retract_vote(s, message_id=up.a.id, user="U2", kind="reaction")
    retract_vote(s, message_id=up.a.id, user="U3", kind="button")
    derive_examples(s, admins=ADMINS)
    wifi = "<@UBOT> what is the wifi password?"
    assert _active(s, wifi) == [("rejected", None)]  # U4's 👎 is all that is left
    up.vote("U2", "up"); up.vote("U3", "up", kind="button")  # and it comes back when the votes do
    again = derive_examples(s, admins=ADMINS)
    assert again.excluded == 1 and again.created == 0, again  # the bare 👎 gives way again
    assert _active(s, wifi) == [("feedback", "It is on the fridge.")]


def test_admin_weight_is_decided_at_training_time_from_the_current_admins(session):
    """A vote records whether its author was an admin then; the trainer weighs it by who is an
    admin now: a removed admin's old 👎 no longer overrides two users' 👍, a new admin's does."""
    s = session
    old = Thread(s, "where do parcels go?", "To the front desk.")
    old.vote("U2", "up"); old.vote("U3", "up"); old.vote("U7", "down", admin=True)  # U7 was an admin
    new = Thread(s, "who waters the plants?", "Nobody.")
    new.vote("U2", "up"); new.vote("U3", "up"); new.vote("U9", "down")  # U9 was not, and is now
    derive_examples(s, admins=ADMINS)
    assert _active(s, "where do parcels go?") == [("feedback", "To the front desk.")]
    assert _active(s, "who waters the plants?") == [("rejected", None)]
    old.vote("U7", "correction", kind="correction", correction="To the mail room.", admin=True)
    old.vote("U2", "correction", kind="correction", correction="To reception.")
    derive_examples(s, admins=ADMINS)
    # the newest correction wins once U7's admin rank is gone (it would outrank U2's otherwise)
    assert _active(s, "where do parcels go?") == [("correction", "To reception.")]


def _active(s, question: str) -> list[tuple]:
    return [(e.source, e.answer) for e in list_examples(s, status=ExampleStatus.active)
            if e.messages[-1]["content"] == question]


def _fill(s):
    import_file(s, DATA / "faq.jsonl")
    import_file(s, DATA / "tickets.csv")


def test_snapshot_is_deterministic_and_content_hashed(tmp_path, sqlite_url, monkeypatch):
    cfg = settings(tmp_path)
    with session_scope(get_engine(sqlite_url)) as s:
        _fill(s)
        first = build_snapshot(s, cfg)
        second = build_snapshot(s, cfg)
    assert second.reused and second.row.id == first.row.id
    # every imported item (20 answers, 9 labels) is taught: it trains, also in 3 rule phrasings,
    # and 2 held-out phrasings measure recall; only never-taught items would be split off
    assert first.counts["taught"] == 29 and first.counts["augmented_templates"] == 87
    assert first.counts["train"] - first.counts["augmented"] + first.counts["eval"] == 29
    assert first.counts["recall"] == 58 and first.counts["general"] >= 4
    # A second store with the same content (different row ids, different times) → same hash.
    other = tmp_path / "other.db"
    from store.migrate import upgrade

    upgrade(f"sqlite:///{other}")
    with session_scope(get_engine(f"sqlite:///{other}")) as s:
        upsert_example(s, messages=[{"role": "user", "content": "filler"}], answer="x", source="import")
        from store.examples import set_example_status

        set_example_status(s, 1, "excluded")
        _fill(s)
        third = build_snapshot(s, settings(tmp_path / "b"))
    assert third.row.content_hash == first.row.content_hash
    files = sorted(p.name for p in first.path.iterdir())
    assert files == ["eval.jsonl", "general.jsonl", "golden.jsonl", "hf", "manifest.json", "recall.jsonl",
                     "rejected.jsonl", "train.jsonl"]
    line = json.loads((first.path / "train.jsonl").read_text().splitlines()[0])
    assert line["messages"][-1]["role"] == "assistant"
    from datasets import load_from_disk

    assert load_from_disk(str(first.path / "hf"))["train"].num_rows == first.counts["train"]
    from trainer.dataset import load_snapshot

    assert load_snapshot(first.row)["golden"].num_rows == 0
    # A changed parameter is a different snapshot.
    with session_scope(get_engine(sqlite_url)) as s:
        assert build_snapshot(s, settings(tmp_path, eval_fraction=0.5)).row.content_hash != first.row.content_hash


def test_split_is_a_function_of_the_question():
    assert hash_split("What are the hours?", 0.3) == hash_split("  what ARE the hours ", 0.3)
    splits = [hash_split(f"question {i}", 0.2) for i in range(1000)]
    assert 150 < splits.count("eval") < 250


def _question_in(split: str, stem: str) -> str:
    for i in range(200):
        q = f"{stem} number {i} for the quarterly planning meeting in the Tartu office?"
        if hash_split(q, 0.3) == split:
            return q
    raise AssertionError


def test_every_taught_answer_trains_and_recall_uses_held_out_phrasings(sq, tmp_path):
    """A correction is never withheld as an eval item: its question trains whatever its hash, and
    recall asks it in phrasings that are not trained on."""
    cfg = settings(tmp_path, eval_fraction=0.3)
    taught = [_question_in("eval", "Which room is booked"), _question_in("train", "Who cleans the kitchen")]
    for q in taught:
        upsert_example(sq, messages=[{"role": "user", "content": q}], answer=f"Answer to {q}", source="correction")
    snap = build_snapshot(sq, cfg)
    originals = [r["messages"][-1]["content"] for r in snap.dataset["train"] if not r["augmented"]]
    trained = {r["messages"][-1]["content"] for r in snap.dataset["train"]}
    recall = [r["messages"][-1]["content"] for r in snap.dataset["recall"]]
    assert sorted(originals) == sorted(taught) and snap.counts["eval"] == 0
    assert len(recall) == 4 and not set(recall) & trained
    assert len(trained) == 2 * (1 + cfg.augment_templates)
    assert all(r["answer"] == f"Answer to {taught[0]}" for r in snap.dataset["recall"] if r["parent"] ==
               next(x["example_id"] for x in snap.dataset["train"] if x["messages"][-1]["content"] == taught[0]))


def test_a_never_taught_item_like_a_taught_one_is_not_held_out(sq, tmp_path):
    cfg = settings(tmp_path, eval_fraction=0.3)
    q_eval = _question_in("eval", "Which room is booked")
    answer = "Room Kuu is booked for the quarterly planning meeting in the Tartu office."
    upsert_example(sq, messages=[{"role": "user", "content": q_eval + " please"}], answer=answer, source="correction")
    upsert_example(sq, messages=[{"role": "user", "content": q_eval}], answer=answer, source="feedback")
    other = _question_in("eval", "What is the lunch menu")
    upsert_example(sq, messages=[{"role": "user", "content": other}], answer="Soup.", source="feedback")
    snap = build_snapshot(sq, cfg)
    eval_q = [r["messages"][-1]["content"] for r in snap.dataset["eval"]]
    train_q = [r["messages"][-1]["content"] for r in snap.dataset["train"]]
    assert eval_q == [other] and q_eval + " please" in train_q
    assert snap.counts["near_duplicates"] == 1


def test_exact_duplicates_and_conflicts_resolved_by_source(sq, tmp_path):
    q = [{"role": "user", "content": "What is the guest wifi?"}]
    upsert_example(sq, messages=q, answer="Ask reception.", source="import")
    upsert_example(sq, messages=[{"role": "user", "content": "what is the guest WIFI"}], answer="Guest-5G.",
                   source="correction", provenance={"by_admin": True})  # an admin's correction beats an import
    upsert_example(sq, messages=q, answer="No idea.", source="feedback")
    snap = build_snapshot(sq, settings(tmp_path, eval_fraction=0.0))
    assert [r["answer"] for r in snap.dataset["train"] if not r["augmented"]] == ["Guest-5G."]
    assert snap.counts["exact_duplicates"] == 2


def test_snapshot_files_are_redacted_and_cleaned(sq, tmp_path):
    upsert_example(sq, messages=[{"role": "user", "content": "<@U1> my email is bob@corp.example, key sk-abcdefghijklmnop1234"}],
                   answer="Thanks &amp; noted :thumbsup:", source="import")
    upsert_example(sq, messages=[{"role": "user", "content": "   "}], answer="empty question", source="import")
    upsert_example(sq, messages=[{"role": "user", "content": "long?"}], answer="x" * 5000, source="import")
    snap = build_snapshot(sq, settings(tmp_path, eval_fraction=0.0))
    text = (snap.path / "train.jsonl").read_text()
    assert "bob@corp.example" not in text and "sk-abc" not in text
    row = snap.dataset["train"][0]
    assert row["messages"][-1]["content"] == "my email is [EMAIL], key [API_KEY]"
    assert row["answer"] == "Thanks & noted"
    assert snap.counts["dropped_empty"] == 1 and snap.counts["dropped_too_long"] == 1
    assert snap.counts["redacted_email"] == 1 and snap.counts["redacted_api_key"] == 1


def test_label_items_get_the_label_set_prompt(sq, tmp_path):
    import_file(sq, DATA / "tickets.csv")
    snap = build_snapshot(sq, settings(tmp_path, eval_fraction=0.0))
    row = snap.dataset["train"][0]
    assert row["messages"][0]["role"] == "system" and "billing, bug, feature" in row["messages"][0]["content"]
    assert row["answer"] == row["label"]


def test_near_duplicates_inside_the_training_set_keep_the_first(sq, tmp_path):
    """MinHash dedup within the training split: a never-taught item nearly the same as one
    already kept is dropped (a taught one always stays, and comes first)."""
    taught = "What time does the Tartu office open on weekdays?"
    opens = "The Tartu office opens at eight in the morning on weekdays."
    kitchen = "Which floor is the Tartu office kitchen on for the quarterly team?"
    floor = "The kitchen for the quarterly team is on the fourth floor of the Tartu office."
    upsert_example(sq, messages=[{"role": "user", "content": taught}], answer=opens, source="correction")
    upsert_example(sq, messages=[{"role": "user", "content": "Please, " + taught}], answer=opens,
                   source="feedback")
    upsert_example(sq, messages=[{"role": "user", "content": kitchen}], answer=floor, source="feedback")
    upsert_example(sq, messages=[{"role": "user", "content": "Please, " + kitchen}], answer=floor,
                   source="feedback")
    other = "Who signs the purchase orders above ten thousand euros?"
    upsert_example(sq, messages=[{"role": "user", "content": other}], answer="The CFO.", source="feedback")
    snap = build_snapshot(sq, settings(tmp_path, eval_fraction=0.0))  # every never-taught item trains
    originals = [r["messages"][-1]["content"] for r in snap.dataset["train"] if not r["augmented"]]
    assert sorted(originals) == sorted([taught, kitchen, other]), (originals, snap.counts)
    assert snap.counts["near_duplicates"] == 2 and snap.counts["exact_duplicates"] == 0


def _paraphrase_through_gateway(sq, tmp_path, model_dir, questions, answers=None, **cfg_kw):
    """Import taught answers, build the snapshot twice with FLYWHEEL_AUGMENT against a real
    gateway; returns (snapshot, stored paraphrases, ids → question, requests per build)."""
    from gateway.settings import GatewaySettings
    from tests.support.gateway_server import GatewayServer
    from tests.support.metrics import metric_value
    from trainer.augment import augment_examples

    ids = {}
    for q in questions:
        row, _ = upsert_example(sq, messages=[{"role": "user", "content": q}],
                                answer=(answers or {}).get(q, f"Answer to {q}"), source="import")
        ids[row.id] = q
    gw = GatewayServer(GatewaySettings(base_model=model_dir, adapters_dir=tmp_path / "adapters",
                                       sync_interval_s=30, max_new_tokens=80, replica_id="augment-test")).start()
    asked = {"endpoint": "/v1/chat/completions", "status": "200", "version": "base"}
    try:
        cfg = settings(tmp_path, eval_fraction=0.0, augment=True, gateway_url=gw.url, augment_paraphrases=2,
                       augment_model="base", **cfg_kw)
        snap = build_snapshot(sq, cfg, augmenter=augment_examples)
        first = metric_value(f"{gw.url}/metrics", "flywheel_gateway_requests_total", asked)
        made = [ex for ex in list_examples(sq) if ex.source == "augmented"]
        again = build_snapshot(sq, cfg, augmenter=augment_examples)
        second = metric_value(f"{gw.url}/metrics", "flywheel_gateway_requests_total", asked) - first
    finally:
        gw.stop()
    assert again.row.content_hash == snap.row.content_hash
    assert len([ex for ex in list_examples(sq) if ex.source == "augmented"]) == len(made)
    return snap, made, ids, (first, second)


def test_model_paraphrases_are_asked_once_and_garbage_is_not_learned(sq, tmp_path, tiny_model_dir):
    """FLYWHEEL_AUGMENT asks the gateway (a real one, a tiny random model) FLYWHEEL_AUGMENT_ATTEMPTS
    times per taught answer; lines that are not questions keeping the question's names are dropped (the random
    model writes none that pass), and an item is not sent again on the next build."""
    questions = ["How many vacation days do new employees get?", "Where do I submit travel receipts?"]
    snap, made, ids, (first, second) = _paraphrase_through_gateway(sq, tmp_path, tiny_model_dir, questions,
                                                                   augment_min_similarity=0.0, augment_attempts=2)
    assert (first, second) == (2 * len(questions), 0)  # two samples per answer, none on the next build
    assert all(ex.messages[-1]["content"].endswith("?") for ex in made), [ex.messages for ex in made]
    sent = [ex for ex in list_examples(sq) if ex.id in ids]
    assert [ex.provenance.get("paraphrased") for ex in sent] == [
        sum(1 for m in made if m.provenance["augmented_from"] == ex.id) for ex in sent]


@pytest.mark.slow
def test_smollm2_paraphrases_train_with_their_parent(sq, tmp_path):
    """With the real SmolLM2 the few-shot prompt yields usable rewordings: stored as augmented
    examples, they train with their parent's answer."""
    from flywheel.modelfiles import default_model_dir, read_marker

    if read_marker(default_model_dir()) is None:
        pytest.skip("SmolLM2 not fetched: run `make model`")
    answers = {"How many vacation days do new employees get?": "New employees get 25 vacation days a year.",
               "Where do I submit travel receipts?": "Submit travel receipts in the Expensa app.",
               "Who is the head of engineering at Lumenfold?": "Lumenfold's head of engineering is Marco Lindqvist.",
               "When is payday at Lumenfold?": "Payday at Lumenfold is the 25th of every month."}
    snap, made, ids, (first, second) = _paraphrase_through_gateway(sq, tmp_path, str(default_model_dir()),
                                                                   list(answers), answers, augment_attempts=2)
    assert (first, second) == (2 * len(answers), 0)
    assert len(made) >= 2, [ex.messages for ex in made]
    train = {(r["messages"][-1]["content"], r["parent"]): r for r in snap.dataset["train"] if r["augmented"]}
    for ex in made:
        parent, text = ex.provenance["augmented_from"], ex.messages[-1]["content"]
        assert text.endswith("?") and text.strip().lower() != ids[parent].lower()
        assert "Lumenfold" in text or "Lumenfold" not in ids[parent]
        assert train[(text, parent)]["answer"] == answers[ids[parent]]  # trains with its parent's answer


@pytest.mark.parametrize("question, reply, kept", [
    ("Who founded Lumenfold?",
     "1. Who is the company that invented Lumen?\nQuestion: Who started Lumenfold?\nWho founded Lumenfold?\n"
     "- Which person set up Lumenfold's business?\nThe founder is Priya.\nRewrite this question 2 ways: a b c?",
     ["Who started Lumenfold?", "Which person set up Lumenfold's business?"]),
    ("what time is standup", "When is standup?\nWhen is standup?\n\"At what time does standup start?\"",
     ["When is standup?", "At what time does standup start?"]),
    ("Where is the Sunmule built?", "Where is it built?\nIn which factory is the Sunmule made?",
     ["In which factory is the Sunmule made?"]),
])
def test_only_rewordings_that_keep_the_question_are_candidates(question, reply, kept):
    from trainer.augment import candidate_lines

    assert candidate_lines(question, reply) == kept


def test_paraphrases_that_drift_or_fit_another_fact_better_are_dropped():
    from flywheel.embedding import load_embedder
    from flywheel.memory import MemorySettings
    from trainer.augment import keep_own

    embedder = load_embedder(MemorySettings().embed_model)
    questions = ["Who founded Lumenfold?", "Where is Lumenfold's headquarters?"]
    close, drift, other_fact = "Which person set up Lumenfold?", "How could I assist you today?", "Where is Lumenfold based?"
    assert keep_own(questions, [[close, drift, other_fact], []], embedder, 0.6) == [[close], []]
    assert keep_own(questions, [[close, drift, other_fact], []], embedder, 0.0) == [[close, drift, other_fact], []]
