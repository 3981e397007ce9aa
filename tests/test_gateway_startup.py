"""Readiness and startup: the gateway answers /healthz at once, is ready only once the production
alias has been read and its adapter loaded, and `flywheel gateway serve` runs as a real process."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from flywheel.adapters import base_model_id
from gateway.settings import GatewaySettings
from store.migrate import upgrade
from tests.support.adapters import make_adapter, promote, register
from tests.support.gateway_server import GatewayServer, free_port

ROOT = Path(__file__).resolve().parents[1]


def wait_backend(url: str, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = httpx.get(f"{url}/readyz").json()
        if body["backend"]["ready"] or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def wait_ready(url: str, timeout_s: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        resp = httpx.get(f"{url}/readyz")
        if resp.status_code == 200 or time.monotonic() > deadline:
            return resp
        time.sleep(0.1)


def test_not_ready_until_the_store_answers(tiny_model_dir, tmp_path, monkeypatch):
    db = tmp_path / "flywheel.db"
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", f"sqlite:///{db}")  # not migrated yet: no tables
    settings = GatewaySettings(base_model=tiny_model_dir, adapters_dir=tmp_path / "adapters", sync_interval_s=0.2)
    server = GatewayServer(settings).start(require_ready=False)
    try:
        assert wait_backend(server.url)["backend"]["ready"]
        time.sleep(0.5)  # a few sync rounds, all failing
        resp = httpx.get(f"{server.url}/readyz")
        assert resp.status_code == 503
        assert "production alias not read from the store" in " ".join(resp.json()["reasons"])
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        # It still answers (with the base model) while it cannot read the store.
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        assert client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=1).model == "base"
        upgrade(f"sqlite:///{db}")
        assert wait_ready(server.url).status_code == 200
    finally:
        server.stop()


def test_ready_only_with_the_production_adapter(tiny_model_dir, sqlite_url, tmp_path):
    adapters = tmp_path / "adapters"
    base = base_model_id(tiny_model_dir)
    register(make_adapter(tiny_model_dir, adapters / "ft-0001", seed=5), "ft-0001", base_model=base,
             sha256="0" * 64)  # a digest that does not match: loading must fail
    promote("ft-0001")
    settings = GatewaySettings(base_model=tiny_model_dir, adapters_dir=adapters, sync_interval_s=0.2,
                               retry_backoff_s=0.1, retry_backoff_max_s=0.2)
    server = GatewayServer(settings).start(require_ready=False)
    try:
        assert wait_backend(server.url)["backend"]["ready"]
        time.sleep(1.0)
        resp = httpx.get(f"{server.url}/readyz")
        assert resp.status_code == 503
        body = resp.json()
        assert body["store_target"] == "ft-0001" and body["production"] == "base"
        assert "does not match its registered sha256" in body["last_error"]
        # Fix it in the store (a new immutable version with the right digest) and promote that.
        register(adapters / "ft-0001", "ft-0002", base_model=base, adapter_path=str(adapters / "ft-0001"))
        promote("ft-0002")
        resp = wait_ready(server.url)
        assert resp.status_code == 200 and resp.json()["production"] == "ft-0002"
    finally:
        server.stop()


def test_flywheel_gateway_serve_cli(tiny_model_dir, sqlite_url, tmp_path):
    port = free_port()
    env = {**os.environ, "FLYWHEEL_BASE_MODEL": str(tiny_model_dir), "FLYWHEEL_API_KEYS": "cli-key",
           "FLYWHEEL_ADAPTERS_DIR": str(tmp_path / "adapters"), "FLYWHEEL_DATABASE_URL": sqlite_url}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "gateway", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not get ready in 60 s"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0)
        resp = client.chat.completions.create(model="production", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)
        assert resp.model == "base"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
        deadline = time.monotonic() + 10
        while True:
            with session_scope() as session:
                replicas = {r.id: r for r in list_replicas(session)}
            if "db-test" in replicas and replicas["db-test"].served.get("production") == "ft-0001":
                break
            assert time.monotonic() < deadline, replicas
            time.sleep(0.1)
        assert replicas["db-test"].backend == "transformers" and replicas["db-test"].loaded == ["ft-0001"]
    finally:
        server.stop()
