"""Store queries the bot's report poller uses: which runs still need their Slack message."""
from __future__ import annotations

from datetime import timedelta

import pytest

from store import runs
from store.errors import NotFoundError
from store.models import RunStatus, utcnow


def test_runs_to_report_follow_a_run_until_reported(session):
    first = runs.queue_run(session, queued_by="U1")
    assert [r.id for r in runs.runs_to_report(session)] == [first.id]
    assert runs.set_report_message(session, first.id, channel="CADMIN", ts="1.0")
    # a second poster (another replica) loses and the message stays the first one's
    assert not runs.set_report_message(session, first.id, channel="CADMIN", ts="2.0")
    assert runs.run_by_report_message(session, "CADMIN", "1.0").id == first.id
    assert runs.run_by_report_message(session, "CADMIN", "2.0") is None
    started = runs.start_run(session, owner="t1", hyperparams={})
    beat = started.heartbeat_at
    runs.finish_run(session, started.id, RunStatus.succeeded, model_version=None)
    runs.mark_run_reported(session, started.id)
    assert runs.runs_to_report(session) == []
    assert runs.get_run(session, started.id).heartbeat_at == beat  # reporting never beats it


def test_runs_to_report_skips_backlog_and_unknown_runs(session):
    old = runs.queue_run(session)
    assert runs.runs_to_report(session, since=utcnow() + timedelta(seconds=5)) == []
    assert [r.id for r in runs.runs_to_report(session, since=utcnow() - timedelta(hours=1))] == [old.id]
    with pytest.raises(NotFoundError):
        runs.set_report_message(session, 999, channel="C", ts="1.0")
    with pytest.raises(NotFoundError):
        runs.mark_run_reported(session, 999)
