"""The vLLM path against a real vLLM CPU server (one per test session): load, route, swap,
unload, and an unreachable vLLM (503 with a clear message, then recovery after a restart)."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from flywheel.adapters import base_model_id
from gateway.settings import GatewaySettings
from gateway.vllm_server import VLLMServer, VLLMServerError, vllm_available
from store.migrate import upgrade
from tests.support.adapters import make_adapter, register, serve_in_production
from tests.support.gateway_server import GatewayServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow
ADMIN = "admin"
MESSAGES = [{"role": "user", "content": "What does the company sell?"}]


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir):
    if not vllm_available():
        pytest.skip("vLLM is not installed: run `make vllm`")
    # vLLM cannot take an already-bound socket: its port is picked free, and should another
    # process take it before vLLM binds it, the start is retried on a fresh port.
    for attempt in range(3):
        server = VLLMServer(tiny_model_dir, served_name="tiny-llama")
        try:
            server.start()
            break
        except VLLMServerError as exc:
            server.cleanup()
            if "address already in use" not in str(exc).lower() or attempt == 2:
                raise
    yield server
    server.cleanup()


@pytest.fixture(scope="module")
def env(vllm_server, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway-vllm")
    url = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(url)
    adapters = tmp / "adapters"
    base = base_model_id(tiny_model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_DATABASE_URL", url)
        for name, seed in (("ft-0001", 11), ("ft-0002", 12)):
            register(make_adapter(tiny_model_dir, adapters / name, seed=seed), name, base_model=base)
        settings = GatewaySettings(backend="vllm", vllm_urls=[vllm_server.url], base_model=tiny_model_dir,
                                   admin_token=ADMIN, adapters_dir=adapters, sync_interval_s=0.5,
                                   replica_id="vllm-test", vllm_timeout_s=60)
        gw = GatewayServer(settings).start()
        yield {"gateway": gw, "vllm": vllm_server, "adapters": adapters, "base": base}
        gw.stop()


def admin_sync(gw) -> dict:
    resp = httpx.post(f"{gw.url}/admin/sync", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def vllm_models(vllm) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm.url}/v1/models").json()["data"]}


def ask(client, model="production", **kw):
    return client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=4,
                                                            temperature=0, **kw)


def test_base_model_through_vllm(env):
    gw, vllm = env["gateway"], env["vllm"]
    serve_in_production(None)  # the base model, whatever another test left
    assert admin_sync(gw)["production"] == "base"
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
    raw = ask(client)
    resp = raw.parse()
    assert resp.model == "base" and raw.headers["X-Flywheel-Model-Version"] == "base"
    direct = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="x").chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=4, temperature=0)
    assert resp.choices[0].message.content == direct.choices[0].message.content
    chunks = list(client.chat.completions.create(model="production", messages=MESSAGES, max_tokens=4,
                                                 temperature=0, stream=True))
    assert {c.model for c in chunks} == {"base"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    comp = client.completions.create(model="base", prompt="Once upon a time", max_tokens=3)
    assert comp.model == "base" and comp.usage.completion_tokens == 3


def test_errors_pass_through_in_openai_shape(env):
    client = openai.OpenAI(base_url=f"{env['gateway'].url}/v1", api_key="x", max_retries=0)
    for stream in (False, True):  # (max_tokens past the context is clamped by the gateway instead)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="production", stream=stream, max_tokens=3,
                                           messages=[{"role": "user", "content": "word " * 1500}])
        assert info.value.code == "context_length_exceeded" and "maximum context length" in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft-0042", messages=MESSAGES, max_tokens=3)


def test_swap_and_unload_under_load(env):
    gw, vllm = env["gateway"], env["vllm"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=60)
    direct = openai.OpenAI(base_url=f"{vllm.url}/v1", api_key="x")
    results, errors, stop = [], [], threading.Event()

    def traffic(stream: bool):
        while not stop.is_set():
            try:
                if stream:
                    chunks = list(client.chat.completions.create(model="production", messages=MESSAGES,
                                                                 max_tokens=4, temperature=0, stream=True))
                    results.append(({c.model for c in chunks}.pop(),
                                    "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)))
                else:
                    r = ask(client).parse()
                    results.append((r.model, r.choices[0].message.content))
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))

    threads = [threading.Thread(target=traffic, args=(s,)) for s in (False, True, False)]
    for t in threads:
        t.start()
    expected: dict[str, str] = {}  # each adapter's text straight from vLLM, asked while it is loaded there
    try:
        for target in ("ft-0001", "ft-0002", None):
            serve_in_production(target)
            assert admin_sync(gw)["production"] == (target or "base")
            if target:
                assert target in vllm_models(vllm)
                expected[target] = direct.chat.completions.create(
                    model=target, messages=MESSAGES, max_tokens=4, temperature=0).choices[0].message.content
            seen = len(results)
            wait_until(lambda: any(m == (target or "base") for m, _ in results[seen:]), 60,
                       f"an answer from {target or 'base'} (errors: {errors[:3]})")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
    texts: dict[str, set[str]] = {}
    for model, text in results:
        texts.setdefault(model, set()).add(text)
    assert set(texts) == {"base", "ft-0001", "ft-0002"}
    for name in ("ft-0001", "ft-0002"):  # each label's text is what vLLM gives for that adapter
        assert texts[name] == {expected[name]}, (name, texts)
    assert expected["ft-0001"] != expected["ft-0002"]  # else the check above could not tell them apart
    # base is production, ft-0002 kept for rollback, ft-0001 drained and unloaded from vLLM
    wait_until(lambda: "ft-0001" not in vllm_models(vllm), 30, "ft-0001 to be unloaded from vLLM")
    assert "ft-0002" in vllm_models(vllm)
    assert {m.id for m in client.models.list()} == {"base", "production", "ft-0002"}


def test_vllm_down_gives_503_and_recovers(env):
    gw, vllm = env["gateway"], env["vllm"]
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0, timeout=30)
    serve_in_production("ft-0002")
    assert admin_sync(gw)["production"] == "ft-0002"
    vllm.stop()
    try:
        for stream in (False, True):
            with pytest.raises(openai.APIStatusError) as info:
                client.chat.completions.create(model="production", messages=MESSAGES, max_tokens=2, stream=stream)
            assert info.value.status_code == 503
            assert "vLLM backend unavailable" in info.value.message and vllm.url not in info.value.message
        assert httpx.get(f"{gw.url}/healthz").status_code == 200
    finally:
        vllm.start()  # same port: the gateway finds it again and gives it back the adapter it lost

    def answered():
        try:
            return ask(client).parse()
        except openai.APIStatusError:
            return None

    resp = wait_until(answered, 60, "the gateway to answer through the restarted vLLM", interval=0.5)
    assert resp.model == "ft-0002"
    assert "ft-0002" in vllm_models(vllm)
