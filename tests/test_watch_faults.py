"""`flywheel train watch` outlives a database outage: it logs, backs off, polls again, and the
next due run succeeds. The outage is real: PostgreSQL behind a TCP hop that is taken down."""
from __future__ import annotations

import threading

import pytest

from store.db import get_engine, session_scope
from store.migrate import upgrade
from store.runs import queue_run
from tests.support.faults import TcpProxy
from tests.support.trainer_env import ended_run, import_facts, tiny_trainer_env
from tests.support.waiting import wait_until

pytestmark = pytest.mark.postgres


def checks(outcome: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("flywheel_trainer_watch_checks_total", {"outcome": outcome}) or 0.0


def test_watch_survives_a_database_outage_and_the_next_run_succeeds(pg_server, tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    from trainer.settings import TrainerSettings
    from trainer.watch import watch

    real = pg_server.create_database()
    upgrade(real)
    proxy = TcpProxy(pg_server.port)
    url = proxy.url_for(real, pg_server.port)
    tiny_trainer_env(monkeypatch, database_url=url, model_dir=tiny_model_dir, work=tmp_path,
                     FLYWHEEL_WATCH_POLL_S="0.2", FLYWHEEL_WATCH_MAX_BACKOFF_S="0.5", FLYWHEEL_WATCH_MIN_NEW="1000")
    import_facts(url)
    stop = threading.Event()
    daemon = threading.Thread(target=watch, args=(TrainerSettings(),), kwargs={"stop": stop}, daemon=True)
    ok0, failed0 = checks("ok"), checks("failed")
    try:
        daemon.start()
        wait_until(lambda: checks("ok") >= ok0 + 2, timeout=120, what="the daemon polling")
        proxy.down()
        wait_until(lambda: checks("failed") >= failed0 + 3, timeout=120, what="failed checks")
        assert daemon.is_alive()
        ok_down = checks("ok")
        proxy.up()
        wait_until(lambda: checks("ok") > ok_down, timeout=120, what="the daemon noticing the database is back")
        with session_scope(get_engine(url)) as s:
            run_id = queue_run(s, queued_by="UADMIN01").id
        run = wait_until(lambda: ended_run(url, run_id), timeout=300, what="the queued run finishing")
        assert run.status == "succeeded" and run.model_version, run.error
        assert daemon.is_alive()
    finally:
        stop.set()
        daemon.join(60)
        proxy.close()
