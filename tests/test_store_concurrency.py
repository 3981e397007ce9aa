"""Races the database must decide: duplicate Slack deliveries and competing trainers."""
from __future__ import annotations

import threading

from store import leases, receipts
from store.db import session_scope
from tests.support.waiting import wait_until


def _race(engine, n, fn):
    barrier = threading.Barrier(n)
    results, errors = [None] * n, []

    def worker(i):
        try:
            with session_scope(engine) as s:
                barrier.wait()
                results[i] = fn(s, i)
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_eight_deliveries_of_one_event_make_one_receipt(engine):
    results = _race(engine, 8, lambda s, _i: receipts.record_event_once(s, "Ev42"))
    assert results.count(True) == 1


def test_two_lease_holders_one_wins(engine):
    results = _race(engine, 2, lambda s, i: leases.acquire_lease(s, "trainer", f"owner-{i}", ttl_s=60))
    assert sorted(results) == [False, True]
    winner = f"owner-{results.index(True)}"
    loser = f"owner-{results.index(False)}"
    with session_scope(engine) as s:
        assert leases.lease_holder(s, "trainer").owner == winner
        assert leases.renew_lease(s, "trainer", winner, ttl_s=60)
        assert not leases.renew_lease(s, "trainer", loser, ttl_s=60)
        assert not leases.acquire_lease(s, "trainer", loser, ttl_s=60)
        assert leases.release_lease(s, "trainer", winner)
        assert leases.lease_holder(s, "trainer") is None
        assert leases.acquire_lease(s, "trainer", loser, ttl_s=60)


def test_expired_lease_is_taken_over_and_old_holder_learns_it(engine):
    with session_scope(engine) as s:
        assert leases.acquire_lease(s, "trainer", "dead", ttl_s=0.2)
        with session_scope(engine) as watcher:  # the store itself says when the lease has run out
            wait_until(lambda: leases.lease_holder(watcher, "trainer") is None, 30, "the lease to expire")
        results = _race(engine, 4, lambda s2, i: leases.acquire_lease(s2, "trainer", f"new-{i}", ttl_s=60))
        assert results.count(True) == 1
        assert not leases.renew_lease(s, "trainer", "dead", ttl_s=60)
