"""The store's query functions on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest

from store import conversations, datasets, examples, feedback, receipts, replicas, runs, versions
from store.audit import list_audit, record_audit
from store.errors import InvalidStateError, NotFoundError
from store.models import FeedbackKind, Role, RunStatus, VersionStatus


def _answer(session, ts="2.0"):
    conversations.record_message(session, channel="C1", ts="1.0", thread_ts=None, role=Role.user,
                                 text="what is x?", author="U1")
    return conversations.record_message(session, channel="C1", ts=ts, thread_ts="1.0", role=Role.assistant,
                                        text="x is y", model_version="base", latency_ms=12.5)


def test_messages_are_recorded_once_and_threaded(session):
    answer = _answer(session)
    again = conversations.record_message(session, channel="C1", ts="2.0", thread_ts="1.0",
                                         role=Role.assistant, text="different text")
    assert again.id == answer.id and again.text == "x is y"
    thread = conversations.thread_messages(session, "C1", "1.0")
    assert [m.role for m in thread] == ["user", "assistant"]
    assert conversations.previous_user_message(session, answer).text == "what is x?"
    assert conversations.count_messages(session, Role.assistant) == 1


def test_latest_vote_wins_and_retraction_is_kept(session):
    answer = _answer(session)
    feedback.upsert_vote(session, message_id=answer.id, user="U2", kind=FeedbackKind.reaction, value="up")
    row = feedback.upsert_vote(session, message_id=answer.id, user="U2", kind=FeedbackKind.reaction, value="down")
    assert row.value == "down" and [h["value"] for h in row.history] == ["up"]
    assert feedback.count_feedback(session) == {"reaction:down": 1}
    # removing a reaction that is no longer the vote changes nothing
    assert feedback.retract_vote(session, message_id=answer.id, user="U2", kind="reaction", value="up") is None
    gone = feedback.retract_vote(session, message_id=answer.id, user="U2", kind="reaction", value="down")
    assert gone.retracted
    assert feedback.feedback_for_message(session, answer.id) == []
    assert len(feedback.feedback_for_message(session, answer.id, include_retracted=True)) == 1
    # voting again revives the row
    feedback.upsert_vote(session, message_id=answer.id, user="U2", kind="reaction", value="down")
    assert feedback.top_downvoted_answers(session)[0][1] == 1


def test_examples_dedupe_by_content_and_count(session):
    msgs = [{"role": "user", "content": "q"}]
    ex, created = examples.upsert_example(session, messages=msgs, answer="a", source="import",
                                          provenance={"file": "faq.jsonl"})
    again, created2 = examples.upsert_example(session, messages=msgs, answer="a", source="import",
                                              provenance={"row": 3}, golden=True)
    assert created and not created2 and again.id == ex.id
    assert again.golden and again.provenance == {"file": "faq.jsonl", "row": 3}
    assert examples.count_examples(session) == {"import": 1, "golden": 1, "total": 1}
    examples.set_example_status(session, ex.id, "excluded")
    assert examples.list_examples(session) == []
    with pytest.raises(ValueError):
        examples.upsert_example(session, messages=msgs, source="import")


def test_event_receipt_once(session):
    assert receipts.record_event_once(session, "Ev1")
    assert not receipts.record_event_once(session, "Ev1")
    assert receipts.record_event_once(session, "Ev2")


def test_runs_progress_and_stale_detection(session):
    queued = runs.queue_run(session, queued_by="UADMIN")
    assert runs.queue_run(session).id == queued.id  # no double queueing
    run = runs.start_run(session, owner="trainer-a", hyperparams={"lr": 1e-3})
    assert run.id == queued.id and run.status == RunStatus.running
    runs.record_progress(session, run.id, step=5, total_steps=10, point={"loss": 1.5})
    assert runs.get_run(session, run.id).progress == 0.5
    assert runs.fail_stale_runs(session, stale_after_s=3600) == []
    stale = runs.fail_stale_runs(session, stale_after_s=-1)
    assert [r.id for r in stale] == [run.id] and "stopped heartbeating" in stale[0].error
    with pytest.raises(NotFoundError):
        runs.get_run(session, 999)


def test_versions_gate_alias_and_history(session):
    snap = datasets.record_snapshot(session, content_hash="h", counts={"train": 1}, params={}, path="/x")
    ok = versions.register_version(session, adapter_path="/a", adapter_sha256="0" * 64, base_model="m",
                                   gate_passed=True, gate_reasons=["beats production"], dataset_snapshot_id=snap.id)
    bad = versions.register_version(session, adapter_path="/b", adapter_sha256="1" * 64, base_model="m",
                                    gate_passed=False, gate_reasons=["too few eval items"])
    assert (ok.name, ok.status) == ("ft-0001", VersionStatus.candidate)
    assert (bad.name, bad.status) == ("ft-0002", VersionStatus.rejected)
    with pytest.raises(InvalidStateError, match="did not pass"):
        versions.move_alias(session, "production", bad.name, actor="U1")
    versions.move_alias(session, "production", ok.name, actor="U1")
    assert versions.alias_target(session) == ok.name
    assert versions.get_version(session, ok.name).status == VersionStatus.production
    versions.move_alias(session, "production", bad.name, actor="U1", force=True, reason="hotfix")
    assert versions.get_version(session, ok.name).status == VersionStatus.retired
    assert versions.rollback_target(session) == ok.name
    versions.move_alias(session, "production", versions.rollback_target(session), actor="U1", reason="rollback")
    history = versions.alias_history(session)
    assert [(h["from"], h["to"]) for h in history] == [("ft-0002", "ft-0001"), ("ft-0001", "ft-0002"), (None, "ft-0001")]
    assert len(list_audit(session, action="alias.move")) == 3


def test_alias_move_is_atomic_with_its_audit_event(session, monkeypatch):
    ok = versions.register_version(session, adapter_path="/a", adapter_sha256="0" * 64, base_model="m",
                                   gate_passed=True, gate_reasons=[])

    def broken_audit(*_a, **_k):
        raise RuntimeError("audit write failed")

    monkeypatch.setattr(versions, "add_audit", broken_audit)
    with pytest.raises(RuntimeError):
        versions.move_alias(session, "production", ok.name, actor="U1")
    session.rollback()
    assert versions.alias_target(session) is None
    assert versions.get_version(session, ok.name).status == VersionStatus.candidate


def test_approve_reject_rules_and_refusal_audit(session):
    bad = versions.register_version(session, adapter_path="/b", adapter_sha256="1" * 64, base_model="m",
                                    gate_passed=False, gate_reasons=["regressed"])
    with pytest.raises(InvalidStateError):
        versions.set_version_status(session, bad.name, VersionStatus.approved, actor="U1")
    with pytest.raises(InvalidStateError, match="reason"):
        versions.set_version_status(session, bad.name, VersionStatus.approved, actor="U1", force=True)
    v = versions.set_version_status(session, bad.name, VersionStatus.approved, actor="U1", force=True, reason="ok")
    assert v.status == VersionStatus.approved
    record_audit(session, actor="U9", action="version.approve", target=bad.name, outcome="refused")
    assert [e.outcome for e in list_audit(session, target=bad.name)] == ["refused", "ok"]


@pytest.mark.parametrize("name", ["../etc", "FT-1", "a", "production", "x/y", "ft 1", ""])
def test_version_names_refuse_path_tricks(name):
    with pytest.raises(ValueError):
        versions.validate_version_name(name)


def test_explicit_version_name_is_immutable(session):
    versions.register_version(session, name="ft-0100", adapter_path="/a", adapter_sha256="0" * 64,
                              base_model="m", gate_passed=True, gate_reasons=[])
    with pytest.raises(InvalidStateError, match="immutable"):
        versions.register_version(session, name="ft-0100", adapter_path="/b", adapter_sha256="1" * 64,
                                  base_model="m", gate_passed=True, gate_reasons=[])


def test_replica_heartbeats(session):
    replicas.heartbeat_replica(session, "gw-1", backend="transformers", served={"production": None}, loaded=[])
    replicas.heartbeat_replica(session, "gw-1", backend="transformers", served={"production": "ft-0001"},
                               loaded=["ft-0001"])
    live = replicas.list_replicas(session)
    assert [(r.id, r.served["production"]) for r in live] == [("gw-1", "ft-0001")]
    assert replicas.list_replicas(session, alive_within_s=-1) == []
