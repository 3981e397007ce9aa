"""The gateway's limits and trust boundaries, against a real gateway (tiny model) on loopback:
the completion budget is clamped, only known fields are accepted, the line is bounded (429 +
Retry-After), a client that hangs up stops its generation, versions by name only when open to
the caller, a stuck load on request never holds up a rollback, and no error, /readyz answer or
log line carries a file path or a database password."""
from __future__ import annotations

import concurrent.futures as cf
import json
import socket

import httpx
import openai
import pytest
from typer.testing import CliRunner

from flywheel.adapters import base_model_id
from gateway.schemas import ChatCompletionRequest
from gateway.settings import GatewaySettings
from store.migrate import upgrade
from tests.support.adapters import make_adapter, promote
from tests.support.gateway_server import GatewayServer
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until

KEY, ADMIN = "limits-key", "limits-admin"
CAP = 8  # FLYWHEEL_MAX_NEW_TOKENS of the gateway under test
HELLO = [{"role": "user", "content": "Tell me a long story about the company."}]
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def _gateway(model_dir, tmp, **overrides) -> GatewayServer:
    settings = dict(base_model=model_dir, api_keys=[KEY], admin_token=ADMIN, adapters_dir=tmp / "adapters",
                    sync_interval_s=0.5, max_new_tokens=CAP, max_queue=4, replica_id=f"limits-{tmp.name}")
    return GatewayServer(GatewaySettings(**{**settings, **overrides}))


@pytest.fixture(scope="module")
def server_for_module(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-limits")
    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        srv = _gateway(tiny_model_dir, tmp).start()
        srv.db_url = url
        yield srv
        srv.stop()


@pytest.fixture
def server(server_for_module, monkeypatch):
    """The shared gateway, with the process reading its store (two module fixtures each point
    FLYWHEEL_DATABASE_URL at their own store; whichever came last would win for every test)."""
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", server_for_module.db_url)
    return server_for_module


def _status(server) -> dict:
    return httpx.get(f"{server.url}/admin/status", headers=ADMIN_AUTH, timeout=10).json()


def _chat(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, timeout=120,
                      json={"model": "production", "messages": HELLO, **body})


# ---- 7: limits ---------------------------------------------------------------------------------
def test_max_tokens_above_the_cap_is_clamped(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    for args in ({"max_tokens": 4000}, {"max_completion_tokens": 4000}, {"max_tokens": 1000}):
        resp = client.chat.completions.create(model="production", messages=HELLO, temperature=0, **args)
        assert 1 <= resp.usage.completion_tokens <= CAP, args
    chunks = list(client.chat.completions.create(model="production", messages=HELLO, temperature=0, max_tokens=1000,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens <= CAP
    text = client.completions.create(model="base", prompt="Once upon a time", max_tokens=4000, temperature=0)
    assert text.usage.completion_tokens <= CAP


@pytest.mark.parametrize("field, value", [("ignore_eos", True), ("min_tokens", 500), ("logit_bias", {"2": -100}),
                                          ("guided_json", {"type": "object"}), ("repetition_penalty", 0.1)])
def test_fields_outside_the_allow_list_are_refused(server, field, value):
    resp = _chat(server, max_tokens=2, **{field: value})
    assert resp.status_code == 400
    assert field in resp.json()["error"]["message"] and "unknown or unsupported field" in resp.json()["error"]["message"]


def test_choices_and_logprobs_are_refused_unless_enabled(server):
    for extra, param in (({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "logprobs")):
        resp = _chat(server, max_tokens=2, **extra)
        assert resp.status_code == 400, extra
        assert resp.json()["error"]["code"] == "unsupported_parameter" and resp.json()["error"]["param"] == param


def test_hostile_requests_are_refused_and_the_next_normal_one_is_answered_at_once(server):
    """Issue 25.4: each request that could hold the model lock or the process is refused before
    the model sees it, and a normal question right after is answered within a normal time."""
    import time

    huge = json.dumps({"model": "production", "messages": [{"role": "user", "content": "x" * (1024 * 1024)}]})
    big = httpx.post(f"{server.url}/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                     content=huge, timeout=60)
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: refused while it streams in
        yield b'{"model": "production", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}]}'
    streamed = httpx.post(f"{server.url}/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                          content=chunked(), timeout=60)
    assert streamed.status_code == 413
    for extra in ({"stop": ["s" * 65]}, {"stop": ["a", "b", "c", "d", "e"]}, {"seed": 2**64},
                  {"seed": -1}, {"messages": HELLO * 257}):
        resp = _chat(server, max_tokens=2, **extra)
        assert resp.status_code == 400, (list(extra), resp.status_code, resp.text[:200])
    started = time.monotonic()
    ok = _chat(server, max_tokens=2, stop=["s" * 64], seed=2**63 - 1)
    assert ok.status_code == 200 and time.monotonic() - started < 30


def test_only_allow_listed_fields_reach_vllm():
    """The upstream body is built from the allow-list: clamped max_tokens, text-only messages."""
    from gateway.backends.vllm import VLLMBackend
    from gateway.limits import apply_limits

    settings = GatewaySettings(backend="vllm", vllm_urls=["http://127.0.0.1:9"], vllm_base_name="tiny",
                               max_new_tokens=CAP, max_choices=2, allow_logprobs=True)
    req = ChatCompletionRequest.model_validate({
        "model": "production", "max_completion_tokens": 4000, "n": 2, "logprobs": True, "user": "u1",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "tool_call_id": "x"}]})
    apply_limits(req, settings)
    body = VLLMBackend(settings)._body(None, "chat", req, stream=False)
    assert body == {"model": "tiny", "stream": False, "max_tokens": CAP, "n": 2, "logprobs": True,
                    "messages": [{"role": "user", "content": "hi"}]}


def test_a_full_line_answers_429_with_retry_after(server):
    """One request generating (the model is held), four waiting (FLYWHEEL_MAX_QUEUE=4): the other
    35 of 40 concurrent requests get 429 + Retry-After at once; the five get at most CAP tokens."""
    backend = server.gateway.backend
    with cf.ThreadPoolExecutor(40) as pool:
        with backend._lock:  # a long generation in progress: nothing finishes until we let go
            admitted = [pool.submit(_chat, server, max_tokens=4000) for _ in range(5)]
            wait_until(lambda: (lambda a: a["running"] == 1 and a["waiting"] == 4)(_status(server)["admission"]),
                       what="one request running and four waiting")
            refused = list(pool.map(lambda _: _chat(server, max_tokens=4000), range(35)))
        answered = [f.result() for f in admitted]
    assert [r.status_code for r in refused] == [429] * 35
    assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in refused)
    assert [r.status_code for r in answered] == [200] * 5
    assert all(1 <= r.json()["usage"]["completion_tokens"] <= CAP for r in answered)
    assert _status(server)["admission"]["running"] == 0


def test_a_client_that_hangs_up_stops_its_generation(tiny_model_dir, tmp_path, sqlite_url):
    """A plain (non-streaming) request whose client leaves mid-generation stops at the next
    token, and the next request is served."""
    budget = 1500  # minutes of generation on a busy CPU if nothing stopped it
    server = _gateway(tiny_model_dir, tmp_path, max_new_tokens=budget).start()
    try:
        body = json.dumps({"model": "base", "messages": HELLO, "max_tokens": budget, "temperature": 0}).encode()
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        wait_until(lambda: _status(server)["base_inflight"] == 1, what="the generation to start")
        conn.close()
        metrics = f"{server.url}/metrics"
        wait_until(lambda: metric_value(metrics, "flywheel_gateway_cancelled_total", {"stage": "running"}) == 1,
                   timeout=120, what="the hang-up to cancel the request")
        discarded = metric_value(metrics, "flywheel_gateway_discarded_tokens_total")
        assert 1 <= discarded < budget  # it stopped early
        assert _status(server)["base_inflight"] == 0 and _status(server)["admission"]["running"] == 0
        assert _chat(server, model="base", max_tokens=2).status_code == 200
    finally:
        server.stop()


# ---- 8: which versions a client may name ---------------------------------------------------------
@pytest.fixture
def versions(versions_for_module, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", versions_for_module.db_url)  # see `server`
    return versions_for_module


@pytest.fixture(scope="module")
def versions_for_module(tiny_model_dir, tmp_path_factory):
    """ft-0001 approved, ft-0002 waiting for review, ft-0003 gate-failed, ft-0004 production
    before ft-0005 (production), ft-0006 production long ago."""
    from flywheel.adapters import adapter_digest
    from store.db import session_scope
    from store.models import VersionStatus
    from store.versions import register_version, set_version_status

    tmp = tmp_path_factory.mktemp("gateway-versions")
    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    adapter = make_adapter(tiny_model_dir, tmp / "adapters" / "lora", seed=3)
    base = base_model_id(tiny_model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        with session_scope() as session:
            for n in range(1, 7):
                register_version(session, name=f"ft-000{n}", adapter_path=str(adapter), base_model=base,
                                 adapter_sha256=adapter_digest(adapter), gate_passed=n != 3,
                                 gate_reasons=["worse than production"] if n == 3 else [])
            set_version_status(session, "ft-0001", VersionStatus.approved, actor="admin")
        for name in ("ft-0006", "ft-0004", "ft-0005"):
            promote(name)
        srv = _gateway(tiny_model_dir, tmp, max_extra_versions=3).start()
        wait_until(lambda: httpx.get(f"{srv.url}/readyz").json()["production"] == "ft-0005", what="ft-0005 live")
        srv.db_url = url
        yield srv
        srv.stop()


def _named(server, name: str, auth=AUTH) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", headers=auth, timeout=120,
                      json={"model": name, "messages": HELLO, "max_tokens": 1})


def test_only_open_versions_can_be_named(versions):
    server = versions
    _make_live(server, "ft-0004")  # what this test needs: ft-0005 live, ft-0004 before it
    _make_live(server, "ft-0005")
    assert _named(server, "ft-0005").json()["model"] == "ft-0005"  # production
    assert _named(server, "ft-0004").json()["model"] == "ft-0004"  # the previous production
    assert _named(server, "ft-0001").json()["model"] == "ft-0001"  # approved
    for name in ("ft-0002", "ft-0003", "ft-0006"):  # unreviewed, gate-failed, retired long ago
        resp = _named(server, name)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found", name
    # The admin token unlocks them; loaded, they still do not exist for everyone else.
    assert _named(server, "ft-0003", ADMIN_AUTH).json()["model"] == "ft-0003"
    assert _named(server, "ft-0003").status_code == 404
    listed = {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}
    assert "ft-0003" not in listed and {"ft-0004", "ft-0005"} <= listed
    assert "ft-0003" in {m["id"] for m in httpx.get(f"{server.url}/v1/models", headers=ADMIN_AUTH).json()["data"]}


def _make_live(server, name: str) -> None:
    """Production at `name` in the store and on this gateway (whatever an earlier test left)."""
    from store.db import session_scope
    from store.versions import PRODUCTION, alias_target

    with session_scope() as s:
        current = alias_target(s, PRODUCTION)
    if current != name:
        promote(name)
    assert _sync(server)["production"] == name


def _sync(server) -> dict:
    resp = httpx.post(f"{server.url}/admin/sync", headers=ADMIN_AUTH, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_stuck_load_on_request_does_not_hold_up_a_rollback(versions):
    server = versions
    _make_live(server, "ft-0005")
    _make_live(server, "ft-0004")  # production ft-0004, previous ft-0005 (kept loaded)
    # a version this gateway has not loaded (another test may have loaded some by name)
    name = next(n for n in ("ft-0001", "ft-0002", "ft-0003", "ft-0006") if n not in _status(server)["loaded"])
    try:
        with cf.ThreadPoolExecutor(1) as pool:
            with server.gateway.backend._lock:  # the model is busy: loading the version has to wait
                pending = pool.submit(_named, server, name, ADMIN_AUTH)
                wait_until(lambda: name in _status(server)["loading"], what=f"{name} to be loading")
                promote("ft-0005")  # roll back to the version every replica still has loaded
                assert _sync(server)["production"] == "ft-0005"
                assert not pending.done()
            assert pending.result().json()["model"] == name
    finally:
        if _status(server)["production"] != "ft-0005":
            promote("ft-0005")
            _sync(server)


# ---- 9: no paths, URLs or passwords in answers and logs --------------------------------------------
def test_readyz_and_errors_carry_no_paths(tmp_path, sqlite_url):
    missing = tmp_path / "models" / "no-such-model"
    server = GatewayServer(GatewaySettings(base_model=missing, adapters_dir=tmp_path / "adapters",
                                           admin_token=ADMIN)).start(require_ready=False)
    try:
        wait_until(lambda: "no-such-model" in json.dumps(_status(server)), what="the backend to fail")
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert str(tmp_path) not in ready.text and "no-such-model" not in ready.text and "reasons" not in ready.json()
        resp = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "base", "messages": HELLO})
        assert resp.status_code == 503
        assert str(tmp_path) not in resp.text and "no-such-model" not in resp.text
    finally:
        server.stop()


def test_database_urls_never_reach_clients_and_are_masked_in_logs(tiny_model_dir, tmp_path, monkeypatch, capfd):
    bad_url = "postgresql:/admin:hunter2@db.internal/flywheel"  # one slash short
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", bad_url)
    server = _gateway(tiny_model_dir, tmp_path).start(require_ready=False)
    try:
        wait_until(lambda: "cannot read" in str(_status(server)["last_error"]), what="a failed store read")
        ready = httpx.get(f"{server.url}/readyz")
        resp = _named(server, "ft-0001")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "store_unavailable"
        for text in (ready.text, resp.text):
            assert "hunter2" not in text and "db.internal" not in text
    finally:
        server.stop()
    from flywheel.app.cli import app

    cli = CliRunner().invoke(app, ["db", "current"])
    logs = capfd.readouterr().err + cli.output
    assert "hunter2" not in logs
    assert "admin:***@db.internal" in logs  # masked where it is printed, not dropped
