"""Store queries the trainer added: thread messages by conversation, snapshots by hash,
feedback since a time, and excluding examples with a reason."""
from __future__ import annotations

from datetime import timedelta

from store.conversations import conversation_messages, record_message
from store.datasets import record_snapshot, snapshot_by_hash
from store.examples import exclude_examples, list_examples, upsert_example
from store.feedback import count_feedback_since, retract_vote, upsert_vote
from store.models import utcnow


def test_conversation_messages_in_order(session):
    q = record_message(session, channel="C", ts="100.2", thread_ts=None, role="user", text="q")
    record_message(session, channel="C", ts="100.9", thread_ts="100.2", role="assistant", text="a")
    record_message(session, channel="C", ts="100.5", thread_ts="100.2", role="user", text="q2")
    record_message(session, channel="C", ts="200.1", thread_ts=None, role="user", text="other thread")
    assert [m.text for m in conversation_messages(session, q.conversation_id)] == ["q", "q2", "a"]


def test_snapshot_by_hash_returns_newest(session):
    assert snapshot_by_hash(session, "h1") is None
    record_snapshot(session, content_hash="h1", counts={}, params={}, path="/a")
    second = record_snapshot(session, content_hash="h1", counts={}, params={}, path="/b")
    record_snapshot(session, content_hash="h2", counts={}, params={}, path="/c")
    assert snapshot_by_hash(session, "h1").id == second.id


def test_count_feedback_since(session):
    m = record_message(session, channel="C", ts="1.1", thread_ts=None, role="assistant", text="a")
    before = utcnow() - timedelta(seconds=1)
    upsert_vote(session, message_id=m.id, user="U1", kind="reaction", value="up")
    upsert_vote(session, message_id=m.id, user="U2", kind="reaction", value="down")
    assert count_feedback_since(session) == 2
    assert count_feedback_since(session, before) == 2
    assert count_feedback_since(session, utcnow() + timedelta(seconds=5)) == 0
    retract_vote(session, message_id=m.id, user="U2", kind="reaction")
    assert count_feedback_since(session, before) == 1


def test_exclude_examples_records_reason(session):
    a, _ = upsert_example(session, messages=[{"role": "user", "content": "x"}], answer="1", source="import")
    b, _ = upsert_example(session, messages=[{"role": "user", "content": "y"}], answer="2", source="import")
    assert exclude_examples(session, [a.id, a.id, 999], "stale") == 1
    assert [e.id for e in list_examples(session)] == [b.id]
    excluded = list_examples(session, status="excluded")
    assert excluded[0].provenance["excluded_reason"] == "stale"
