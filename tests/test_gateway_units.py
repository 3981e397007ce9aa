"""Small pieces of the gateway: settings parsing, stop-sequence trimming, adapter path checks, and
the vLLM relay (stream chunks relabelled as bytes; end to end against a fake vLLM server)."""
from __future__ import annotations

import json
import os

import httpx
import openai
import pytest
from pydantic import ValidationError

from flywheel.adapters import AdapterError
from gateway.settings import GatewaySettings
from gateway.sse import Relabel, StreamError
from gateway.stops import StopTrimmer
from gateway.sync import resolve_adapter_path
from store.migrate import upgrade
from tests.support.fake_vllm import FakeVLLM, compact
from tests.support.gateway_server import GatewayServer
from tests.support.metrics import metric_value


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_BACKEND", "vllm")
    monkeypatch.setenv("FLYWHEEL_VLLM_URLS", "http://127.0.0.1:8001/, http://127.0.0.1:8002")
    monkeypatch.setenv("FLYWHEEL_API_KEYS", "k1,k2")
    monkeypatch.setenv("FLYWHEEL_ADMIN_TOKEN", "adm")
    monkeypatch.setenv("FLYWHEEL_SYNC_INTERVAL_S", "0.5")
    s = GatewaySettings()
    assert s.backend == "vllm"
    assert s.vllm_urls == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert s.api_keys == ["k1", "k2"] and s.admin_token == "adm" and s.sync_interval_s == 0.5


def test_settings_defaults_and_errors(monkeypatch):
    for key in list(os.environ):
        if key.startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    s = GatewaySettings()
    assert s.backend == "transformers" and s.api_keys == [] and s.sync_interval_s == 2
    assert str(s.base_model) == "models/smollm2-135m-instruct" and s.resolved_device() in ("cpu", "cuda")
    with pytest.raises(ValidationError, match="backend"):
        GatewaySettings(backend="tgi")
    with pytest.raises(ValidationError, match="http"):
        GatewaySettings(vllm_urls="localhost:8000")
    with pytest.raises(ValidationError, match="device"):
        GatewaySettings(device="tpu")


@pytest.mark.parametrize("pieces, stops, expected", [
    (["Hello", " wor", "ld"], [], "Hello world"),
    (["Hello", " wor", "ld. More"], ["world"], "Hello "),
    (["ab", "c<", "|end", "|>tail"], ["<|end|>"], "abc"),
    (["no stop", " here"], ["zzz"], "no stop here"),
    (["x", "STOP"], ["STOP", "x"], ""),
])
def test_stop_trimmer(pieces, stops, expected):
    trimmer = StopTrimmer(stops)
    out = "".join(trimmer.feed(p) for p in pieces) + trimmer.flush()
    assert out == expected
    assert trimmer.stopped == (expected != "".join(pieces))


def test_adapter_paths_must_stay_inside_the_adapters_dir(tmp_path, monkeypatch):
    root = tmp_path / "adapters"
    (root / "ft-0001").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "sneaky").symlink_to(tmp_path / "secret")
    monkeypatch.chdir(tmp_path)
    assert resolve_adapter_path(str(root / "ft-0001"), root) == (root / "ft-0001").resolve()
    assert resolve_adapter_path("adapters/ft-0001", root) == (root / "ft-0001").resolve()
    assert resolve_adapter_path("ft-0001", root) == (root / "ft-0001").resolve()
    for bad in ("../secret", str(tmp_path / "secret"), "adapters/../secret", "sneaky", "/etc", str(root), "",
                "ft\x00-1"):
        with pytest.raises(AdapterError):
            resolve_adapter_path(bad, root)


# ---- the vLLM relay: stream chunks relabelled as bytes, with the old decode-and-encode as the reference
WEIRD = 'tiny "llama" \\ é'  # a served name that needs JSON escaping
CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "",
         "choices": [{"index": 0, "delta": {"content": ""}, "logprobs": None, "finish_reason": None}]}


def _chunk(model: str, content: str = "hi", **extra) -> dict:
    return {**CHUNK, "model": model, "choices": [{**CHUNK["choices"][0], "delta": {"content": content}}], **extra}


def _reference(data: bytes, label: str) -> dict:
    """What the gateway made of a chunk before the relay: decode, set `model`, encode."""
    chunk = json.loads(data)
    chunk["model"] = label
    return chunk


def _decoded(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[len(b"data: "):-2])


def _model_field(name: str) -> bytes:
    return b'"model":' + json.dumps(name, ensure_ascii=False).encode()


@pytest.mark.parametrize("upstream", ["tiny-llama", WEIRD])
@pytest.mark.parametrize("content", ["hi", '"model":"tiny-llama"', f'say "model":{json.dumps(WEIRD)}', "é \\ \n \u2028"])
def test_relabel_renames_only_the_model_key(upstream, content):
    data = compact(_chunk(upstream, content))
    event, usage = Relabel(upstream, "ft-0002")(data)
    assert _decoded(event) == _reference(data, "ft-0002") and usage is None
    # the fast path: vLLM's own bytes, only the model's value replaced (text that mentions it is kept)
    assert event == b"data: " + data.replace(_model_field(upstream), _model_field("ft-0002")) + b"\n\n"


@pytest.mark.parametrize("data", [
    json.dumps(_chunk(WEIRD)).encode(),  # non-ASCII escaped and spaces: not the bytes we look for
    compact(_chunk(WEIRD, **{'x"model': WEIRD})),  # a key ending in `"model` makes a second match: decoded
    compact(_chunk("another-name")),  # a name other than the one we sent: decoded
    compact(_chunk(WEIRD, content="error")),  # the token "error", though not an error chunk
])
def test_relabel_decodes_what_it_cannot_prove(data):
    event, usage = Relabel(WEIRD, "base")(data)
    assert _decoded(event) == _reference(data, "base") and usage is None


def test_relabel_returns_the_usage():
    usage = {"prompt_tokens": 7, "total_tokens": 10, "completion_tokens": 3}
    data = compact({**CHUNK, "model": "tiny-llama", "choices": [], "usage": usage})
    event, found = Relabel("tiny-llama", "base")(data)
    assert found == usage and _decoded(event) == _reference(data, "base")
    assert Relabel("tiny-llama", "base")(compact(_chunk("tiny-llama", usage=None)))[1] is None


@pytest.mark.parametrize("data", [
    json.dumps({"error": {"object": "error", "message": "boom", "type": "InternalServerError", "param": None,
                          "code": 500}}).encode(),  # vLLM writes these with json.dumps: spaces
    b'{"error":"boom"}',
])
def test_relabel_raises_on_error_chunks(data):
    with pytest.raises(StreamError, match="boom"):
        Relabel("tiny-llama", "base")(data)
    finishing = compact({**_chunk("tiny-llama"), "error": "x"})  # with choices it is a chunk, as before
    assert _decoded(Relabel("tiny-llama", "base")(finishing)[0])["error"] == "x"


# ---- the vLLM path end to end, against a fake vLLM server -------------------------------------------
KEY = "units-key"
CAP = 8
PIECES = ("Say ", '"model":"tiny-llama"', " é")  # completion text that names the model


@pytest.fixture(scope="module", params=["tiny-llama", WEIRD])
def relay(request, tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("gateway-relay")
    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    fake = FakeVLLM(request.param, PIECES).start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        # the base is identified from its files (config, weight headers), as adapters are checked against it
        settings = GatewaySettings(backend="vllm", vllm_urls=[fake.url], base_model=tiny_model_dir, api_keys=[KEY],
                                   adapters_dir=tmp / "adapters", sync_interval_s=60, max_new_tokens=CAP,
                                   replica_id="relay-test")
        gw = GatewayServer(settings).start()
        yield gw, fake
        gw.stop()
    fake.stop()


def _openai(gw):
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _metric(gw, name: str, **labels) -> float:
    return metric_value(f"{gw.url}/metrics", name, labels)


def test_relay_answers_relabelled_and_counted(relay):
    gw, fake = relay
    tokens = {"kind": "completion", "version": "base"}
    before = _metric(gw, "flywheel_gateway_tokens_total", **tokens)
    raw = _openai(gw).chat.completions.with_raw_response.create(
        model="production", messages=[{"role": "user", "content": "hi"}], max_tokens=4000, temperature=0,
        user="u1", seed=2**63 - 1)  # the largest seed the engines take (larger: 400, test_gateway_limits)
    resp = raw.parse()
    assert raw.headers["X-Flywheel-Model-Version"] == "base" and resp.model == "base"
    assert resp.choices[0].message.content == "".join(PIECES) and resp.usage.completion_tokens == len(PIECES)
    assert _metric(gw, "flywheel_gateway_tokens_total", **tokens) == before + len(PIECES)
    assert fake.received[-1] == {"model": fake.served_name, "stream": False, "max_tokens": CAP, "n": 1, "temperature": 0,
                                 "seed": 2**63 - 1, "messages": [{"role": "user", "content": "hi"}]}
    text = _openai(gw).completions.create(model="base", prompt="Once", max_tokens=2)
    assert text.model == "base" and text.choices[0].text == "".join(PIECES)


@pytest.mark.parametrize("chat", [True, False])
def test_relay_streams_relabelled_and_counted(relay, chat):
    gw, fake = relay
    tokens = {"kind": "completion", "version": "base"}
    before = _metric(gw, "flywheel_gateway_tokens_total", **tokens)
    args = {"model": "production", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    client = _openai(gw)
    if chat:
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **args))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        chunks = list(client.completions.create(prompt="Once", **args))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert {c.model for c in chunks} == {"base"} and text == "".join(PIECES)
    assert chunks[-1].usage.completion_tokens == len(PIECES)
    assert _metric(gw, "flywheel_gateway_tokens_total", **tokens) == before + len(PIECES)
    assert fake.received[-1]["stream"] is True and fake.received[-1]["stream_options"] == {"include_usage": True}


def test_relay_reports_a_mid_stream_error(relay):
    gw, fake = relay
    failed = {"endpoint": "/v1/chat/completions", "version": "base", "status": "502"}
    before = _metric(gw, "flywheel_gateway_requests_total", **failed)
    fake.script = [compact(_chunk(fake.served_name, "Hel")),
                   json.dumps({"error": {"object": "error", "message": "engine died", "code": 500}}).encode()]
    try:
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "base", "messages": [{"role": "user", "content": "hi"}], "stream": True},
                          timeout=30) as resp:
            assert resp.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in resp.iter_lines() if line]
    finally:
        fake.script = None
    assert events[0]["model"] == "base" and events[0]["choices"][0]["delta"]["content"] == "Hel"
    assert events[1] == {"error": {"message": "the vLLM backend failed mid-stream", "type": "server_error",
                                   "code": "backend_error", "param": None}}
    assert len(events) == 2  # no [DONE] after an error, as before
    assert _metric(gw, "flywheel_gateway_requests_total", **failed) == before + 1


@pytest.mark.parametrize("path, body, status, fragment", [
    ("chat/completions", {"ignore_eos": True}, 400, "ignore_eos: unknown or unsupported field"),
    ("chat/completions", {"stream_options": {"continuous_usage_stats": True}}, 400,
     "stream_options.continuous_usage_stats: unknown or unsupported field"),
    ("completions", {"min_tokens": 5}, 400, "min_tokens: unknown or unsupported field"),
    ("chat/completions", {"temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {"n": 2}, 400, "n=2 is not allowed"),
])
def test_relay_refuses_what_the_schemas_refuse(relay, path, body, status, fragment):
    gw, fake = relay
    base = {"model": "base", "max_tokens": 2,
            **({"messages": [{"role": "user", "content": "hi"}]} if path.startswith("chat") else {"prompt": "x"})}
    sent = len(fake.received)
    resp = httpx.post(f"{gw.url}/v1/{path}", json={**base, **body}, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == status and fragment in resp.json()["error"]["message"], resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error" and len(fake.received) == sent


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_relay_routes_check_the_key_and_the_body(relay, path):
    gw, fake = relay
    url, auth, sent = f"{gw.url}/v1/{path}", {"Authorization": f"Bearer {KEY}"}, len(fake.received)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = httpx.post(url, json={"model": "base"}, headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    for content, ctype in ((b"{not json", "application/json"), (b'{"model": "base"}', "text/plain"),
                           (b"", "application/json")):
        resp = httpx.post(url, content=content, headers={**auth, "Content-Type": ctype})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error", resp.text
    assert len(fake.received) == sent


def test_generation_threads_run_nicer_than_the_event_loop():
    """The transformers backend's generation threads, and the torch worker threads they start,
    run FLYWHEEL_GENERATION_NICE steps nicer, so acks and streaming on the same cores are never
    starved by generation (bench/bot/run.py)."""
    import threading
    from pathlib import Path

    import torch

    from gateway.backends.transformers import _lower_priority

    def nice_of_threads() -> dict[int, int]:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            stat = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[int(tid)] = int(stat[16])
        return out

    if not Path("/proc/self/task").is_dir():
        pytest.skip("per-thread niceness is read from Linux /proc")
    base = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(nice_of_threads())
    seen = {}

    def generate():
        _lower_priority(3)
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        for _ in range(3):
            a @ a
        seen["me"], seen["threads"] = threading.get_native_id(), nice_of_threads()

    thread = threading.Thread(target=generate)
    thread.start()
    thread.join()
    assert seen["threads"][seen["me"]] == base + 3
    started = {tid: nice for tid, nice in seen["threads"].items() if tid not in before and tid != seen["me"]}
    assert all(nice == base + 3 for nice in started.values())
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the event loop's thread is untouched
