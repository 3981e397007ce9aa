"""The gateway's OpenAI API, driven by the official openai client against a real server on loopback."""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest

from gateway.settings import GatewaySettings
from store.migrate import upgrade
from tests.support.gateway_server import GatewayServer
from tests.support.metrics import metric_value

KEY = "test-key-123"
ADMIN = "admin-token-456"
HELLO = [{"role": "user", "content": "Hello there, who are you?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-api")
    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        settings = GatewaySettings(base_model=tiny_model_dir, api_keys=[KEY, "second-key"], admin_token=ADMIN,
                                   adapters_dir=tmp / "adapters", sync_interval_s=5, max_new_tokens=16,
                                   replica_id="api-test")
        srv = GatewayServer(settings).start()
        yield srv
        srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def test_chat_completion_names_the_version(client):
    raw = client.chat.completions.with_raw_response.create(model="production", messages=HELLO, max_tokens=5,
                                                            temperature=0)
    assert raw.headers["X-Flywheel-Model-Version"] == "base"
    resp = raw.parse()
    assert resp.model == "base"
    assert resp.object == "chat.completion"
    assert isinstance(resp.choices[0].message.content, str) and resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert 1 <= resp.usage.completion_tokens <= 5
    assert resp.usage.prompt_tokens > 5  # the chat template wraps the message


def test_streaming_matches_non_streaming(client):
    whole = client.chat.completions.create(model="base", messages=HELLO, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="base", messages=HELLO, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.model == "base" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_ends_with_done(server):
    body = {"model": "production", "messages": HELLO, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-flywheel-model-version"] == "base"
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_completions(client):
    resp = client.completions.create(model="base", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert resp.model == "base" and resp.object == "text_completion"
    assert resp.choices[0].text and resp.usage.completion_tokens <= 4
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="The capital of France is", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == resp.choices[0].text


def test_stop_sequences_are_cut(client):
    # Seeded sampling is reproducible and, unlike greedy decoding of a random model, varied.
    args = {"model": "base", "messages": HELLO, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    text = client.chat.completions.create(**args).choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop.strip(), f"output too varied-less to pick a stop string: {text!r}"
    cut = text[: text.index(stop)]
    resp = client.chat.completions.create(**args, stop=[stop])
    assert resp.choices[0].message.content == cut
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        **args, stop=stop, stream=True) if c.choices)
    assert streamed == cut


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["base", "production"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="ft-9999", messages=HELLO, max_tokens=2)
    assert info.value.code == "model_not_found"
    assert "ft-9999" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="../../etc/passwd", messages=HELLO, max_tokens=2)


@pytest.mark.parametrize("body, fragment", [
    ({"model": "production"}, "messages"),
    ({"model": "production", "messages": []}, "messages"),
    ({"model": "production", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"model": "production", "messages": HELLO, "temperature": 7}, "temperature"),
    ({"model": "production", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO}, "model"),
])
def test_malformed_requests_are_400(server, body, fragment):
    resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and fragment in error["message"]


def test_not_json_is_400(server):
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert resp.status_code == 400
    assert "error" in resp.json()


def test_context_overflow_is_400(client):
    long_prompt = "word " * 3000  # the tiny model's context is 2048 tokens
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="production", messages=[{"role": "user", "content": long_prompt}],
                                           max_tokens=4, stream=stream)
        assert info.value.code == "context_length_exceeded"
        assert "maximum context length is 2048" in info.value.message
    # max_tokens beyond the context is clamped to the gateway's FLYWHEEL_MAX_NEW_TOKENS (16 here)
    resp = client.chat.completions.create(model="production", messages=HELLO, max_tokens=5000)
    assert 1 <= resp.usage.completion_tokens <= 16


def test_api_keys(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", max_retries=0)
        if not key:
            resp = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "base", "messages": HELLO})
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
            continue
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="base", messages=HELLO, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    second = openai.OpenAI(base_url=f"{server.url}/v1", api_key="second-key", max_retries=0)
    assert second.chat.completions.create(model="base", messages=HELLO, max_tokens=1).model == "base"


def test_admin_sync_needs_the_admin_token(server):
    assert httpx.post(f"{server.url}/admin/sync").status_code == 401
    assert httpx.post(f"{server.url}/admin/sync", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    resp = httpx.post(f"{server.url}/admin/sync", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert resp.status_code == 200 and resp.json()["production"] == "base"


def test_health_ready_and_metrics(server, client):
    metrics = f"{server.url}/metrics"
    served = {"endpoint": "/v1/chat/completions", "status": "200", "version": "base"}

    def values() -> tuple[float, float, float]:
        return (metric_value(metrics, "flywheel_gateway_requests_total", served),
                metric_value(metrics, "flywheel_gateway_request_seconds_count", {"endpoint": "/v1/chat/completions",
                                                                                 "stream": "false"}),
                metric_value(metrics, "flywheel_gateway_tokens_total", {"kind": "completion", "version": "base"}))

    before = values()
    resp = client.chat.completions.create(model="production", messages=HELLO, max_tokens=2)
    after = values()
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1  # this request, counted and timed
    assert after[2] == before[2] + resp.usage.completion_tokens
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["production"] == "base"
    assert metric_value(metrics, "flywheel_gateway_production_version", {"version": "base"}) == 1.0


def test_concurrent_requests_and_a_dropped_stream(server, client):
    # A client that hangs up mid-stream must not wedge the model lock.
    body = {"model": "base", "messages": HELLO, "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        next(resp.iter_lines())

    def ask(i):
        return client.chat.completions.create(model="base", messages=HELLO, max_tokens=4, temperature=0)

    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert len({a.choices[0].message.content for a in answers}) == 1
    assert server.gateway.registry.base_inflight == 0
