"""Readiness and startup: the gateway answers /healthz at once, is ready only once the production
alias has been read and its adapter loaded, and `flywheel gateway serve` runs as a real process."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai

from flywheel.adapters import base_model_id
from gateway.settings import GatewaySettings
from store.migrate import upgrade
from tests.support.adapters import make_adapter, promote, register
from tests.support.gateway_server import GatewayServer
from tests.support.metrics import metric_value
from tests.support.net import listening_socket, port_of
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]


def wait_backend(url: str, timeout_s: float = 60) -> dict:
    return wait_until(lambda: (body := httpx.get(f"{url}/readyz").json())["backend"]["ready"] and body,
                      timeout_s, "the backend to be ready")


def wait_ready(url: str, timeout_s: float = 60) -> httpx.Response:
    return wait_until(lambda: (resp := httpx.get(f"{url}/readyz")).status_code == 200 and resp,
                      timeout_s, "/readyz to answer 200")


def admin_status(server, token: str = "adm") -> dict:
    """The full readiness detail (reasons, errors, loaded versions): an admin's view."""
    resp = httpx.get(f"{server.url}/admin/status", headers={"Authorization": f"Bearer {token}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def counter(server, name: str) -> float:
    return metric_value(f"{server.url}/metrics", name)


def wait_counter(server, name: str, at_least: float, timeout_s: float = 60) -> float:
    """Wait until the gateway's counter `name` reaches `at_least`: the event it counts happened."""
    return wait_until(lambda: (v := counter(server, name)) >= at_least and v, timeout_s,
                      f"{name} >= {at_least}")


def heartbeat_at(replica_id: str):
    from store.db import session_scope
    from store.replicas import list_replicas

    with session_scope() as session:
        row = {r.id: r for r in list_replicas(session, alive_within_s=None)}.get(replica_id)
        return row.heartbeat_at if row else None


def test_not_ready_until_the_store_answers(tiny_model_dir, tmp_path, monkeypatch):
    db = tmp_path / "flywheel.db"
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", f"sqlite:///{db}")  # not migrated yet: no tables
    settings = GatewaySettings(base_model=tiny_model_dir, adapters_dir=tmp_path / "adapters", sync_interval_s=0.2,
                               admin_token="adm")
    server = GatewayServer(settings).start(require_ready=False)
    try:
        assert wait_backend(server.url)["backend"]["ready"]
        wait_counter(server, "flywheel_gateway_sync_errors_total", 2)  # two sync rounds, both failed
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        assert "production alias not read from the store" in " ".join(admin_status(server)["reasons"])
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        # It still answers (with the base model) while it cannot read the store.
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=1).model == "base"
        upgrade(f"sqlite:///{db}")
        assert wait_ready(server.url).status_code == 200
    finally:
        server.stop()


def _broken_production(tiny_model_dir, adapters: Path, seed: int) -> str:
    """ft-0001 registered with a digest its files do not have, and promoted: every load fails."""
    base = base_model_id(tiny_model_dir)
    register(make_adapter(tiny_model_dir, adapters / "ft-0001", seed=seed), "ft-0001", base_model=base,
             sha256="0" * 64)
    promote("ft-0001")
    return base


def test_ready_only_with_the_production_adapter(tiny_model_dir, sqlite_url, tmp_path):
    adapters = tmp_path / "adapters"
    base = _broken_production(tiny_model_dir, adapters, seed=5)
    settings = GatewaySettings(base_model=tiny_model_dir, adapters_dir=adapters, sync_interval_s=0.2,
                               retry_backoff_s=0.1, retry_backoff_max_s=0.2, admin_token="adm")
    server = GatewayServer(settings).start(require_ready=False)
    try:
        assert wait_backend(server.url)["backend"]["ready"]
        wait_counter(server, "flywheel_gateway_swap_failures_total", 2)  # failed, retried, failed again
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        body = admin_status(server)
        assert body["store_target"] == "ft-0001" and body["production"] == "base"
        assert "does not match its registered sha256" in body["last_error"]
        # Fix it in the store (a new immutable version with the right digest) and promote that.
        register(adapters / "ft-0001", "ft-0002", base_model=base, adapter_path=str(adapters / "ft-0001"))
        promote("ft-0002")
        resp = wait_ready(server.url)
        assert resp.status_code == 200 and resp.json()["production"] == "ft-0002"
    finally:
        server.stop()


def test_a_failed_load_is_retried_with_exponential_backoff(tiny_model_dir, sqlite_url, tmp_path, capfd):
    """Each failed attempt doubles the wait before the next one, up to the maximum (the delay is
    what the gateway logs with each failure; when the retries happen is the clock's business)."""
    adapters = tmp_path / "adapters"
    _broken_production(tiny_model_dir, adapters, seed=6)
    settings = GatewaySettings(base_model=tiny_model_dir, adapters_dir=adapters, sync_interval_s=0.05,
                               retry_backoff_s=0.05, retry_backoff_max_s=0.2)
    server = GatewayServer(settings).start(require_ready=False)
    try:
        wait_counter(server, "flywheel_gateway_swap_failures_total", 4)
    finally:
        server.stop()
    logged = [line for line in capfd.readouterr().err.splitlines() if "swap_failed" in line]
    delays = {int(re.search(r"attempt=(\d+)", line).group(1)): float(re.search(r"retry_in_s=([\d.]+)", line).group(1))
              for line in logged}
    assert [delays.get(n) for n in (1, 2, 3, 4)] == [0.05, 0.1, 0.2, 0.2], logged


def test_no_retry_before_the_backoff_is_over_but_admin_sync_retries_at_once(tiny_model_dir, sqlite_url,
                                                                              tmp_path):
    adapters = tmp_path / "adapters"
    _broken_production(tiny_model_dir, adapters, seed=7)
    settings = GatewaySettings(base_model=tiny_model_dir, adapters_dir=adapters, sync_interval_s=0.05,
                               retry_backoff_s=600, retry_backoff_max_s=600, admin_token="adm",
                               replica_id="backoff-test")
    server = GatewayServer(settings).start(require_ready=False)
    try:
        wait_counter(server, "flywheel_gateway_swap_failures_total", 1)
        # The proof that nothing was retried: three later sync rounds (each ends with a heartbeat).
        seen = {heartbeat_at("backoff-test")}
        wait_until(lambda: seen.add(heartbeat_at("backoff-test")) or len(seen) >= 4, 30,
                   "three more sync rounds")
        assert counter(server, "flywheel_gateway_swap_failures_total") == 1
        assert httpx.get(f"{server.url}/readyz").status_code == 503
        # An admin's sync does not wait for the backoff: it tries (and here fails) again now.
        resp = httpx.post(f"{server.url}/admin/sync", headers={"Authorization": "Bearer adm"}, timeout=60)
        assert resp.status_code == 200 and "does not match its registered sha256" in resp.json()["last_error"]
        assert counter(server, "flywheel_gateway_swap_failures_total") == 2
    finally:
        server.stop()


def test_flywheel_gateway_serve_cli(tiny_model_dir, sqlite_url, tmp_path):
    """The real process, serving on a socket this test bound to port 0 and hands over (--fd)."""
    sock = listening_socket()
    env = {**os.environ, "FLYWHEEL_BASE_MODEL": str(tiny_model_dir), "FLYWHEEL_API_KEYS": "cli-key",
           "FLYWHEEL_ADAPTERS_DIR": str(tmp_path / "adapters"), "FLYWHEEL_DATABASE_URL": sqlite_url}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "gateway", "serve", "--fd", str(sock.fileno())],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            pass_fds=(sock.fileno(),))
    url = f"http://127.0.0.1:{port_of(sock)}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        try:
            return httpx.get(f"{url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 120, "the gateway process to be ready")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0)
        resp = client.chat.completions.create(model="production", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)
        assert resp.model == "base"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sock.close()


def test_serve_refuses_bad_settings(tmp_path):
    env = {**os.environ, "FLYWHEEL_BACKEND": "vllm", "FLYWHEEL_VLLM_URLS": ""}
    out = subprocess.run([sys.executable, "-c", "from gateway.commands import gateway_app; gateway_app()",
                          "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "FLYWHEEL_VLLM_URLS" in out.stderr
    env["FLYWHEEL_SYNC_INTERVAL_S"] = "-1"
    out = subprocess.run([sys.executable, "-c", "from gateway.commands import gateway_app; gateway_app()",
                          "serve"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "sync_interval_s" in out.stderr


def test_sync_and_heartbeat_on_each_database(tiny_model_dir, db_url, tmp_path):
    """The sync loop only uses store functions, so SQLite and PostgreSQL behave alike."""
    from store.db import session_scope
    from store.replicas import list_replicas

    adapters = tmp_path / "adapters"
    register(make_adapter(tiny_model_dir, adapters / "ft-0001", seed=9), "ft-0001",
             base_model=base_model_id(tiny_model_dir))
    settings = GatewaySettings(base_model=tiny_model_dir, adapters_dir=adapters, sync_interval_s=0.2,
                               admin_token="adm", replica_id="db-test")
    server = GatewayServer(settings).start()
    try:
        promote("ft-0001")
        resp = httpx.post(f"{server.url}/admin/sync", headers={"Authorization": "Bearer adm"}, timeout=60)
        assert resp.json()["production"] == "ft-0001"
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model="production", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=1).model == "ft-0001"
        def replicas():
            with session_scope() as session:
                found = {r.id: r for r in list_replicas(session)}
            return found if "db-test" in found and found["db-test"].served.get("production") == "ft-0001" else None

        replicas = wait_until(replicas, 30, "the replica's heartbeat to show ft-0001")
        assert replicas["db-test"].backend == "transformers" and replicas["db-test"].loaded == ["ft-0001"]
    finally:
        server.stop()
