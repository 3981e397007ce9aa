"""Hot-swap with the transformers backend: promote A, then B, roll back, while clients keep asking;
broken adapters are refused and the old version keeps serving."""
from __future__ import annotations

import shutil
import threading
import time

import httpx
import openai
import pytest

from flywheel.adapters import base_model_id
from gateway.settings import GatewaySettings
from store.db import session_scope
from store.migrate import upgrade
from store.replicas import list_replicas
from tests.support.adapters import make_adapter, promote, register
from tests.support.gateway_server import GatewayServer
from tests.support.metrics import metric_value
from tests.support.waiting import wait_until

ADMIN = "admin-token"  # also the clients' key: versions named directly are an admin's to ask for
MESSAGES = [{"role": "user", "content": "Tell me a fact about the company."}]


@pytest.fixture(scope="module")
def made(tiny_model_dir, tmp_path_factory):
    """Two real LoRA adapters, made once; each test copies them into its own adapters directory."""
    out = tmp_path_factory.mktemp("gateway-swap-adapters")
    for name, seed in (("ft-0001", 1), ("ft-0002", 2)):
        make_adapter(tiny_model_dir, out / name, seed=seed)
    return out


@pytest.fixture
def env(made, tiny_model_dir, tmp_path, monkeypatch):
    """A fresh store and gateway per test (production: the base model, ft-0001 and ft-0002
    registered, nothing else loaded): no test depends on what another one left behind."""
    url = f"sqlite:///{tmp_path / 'flywheel.db'}"
    upgrade(url)
    adapters = tmp_path / "adapters"
    for name in ("ft-0001", "ft-0002"):
        shutil.copytree(made / name, adapters / name)
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    base = base_model_id(tiny_model_dir)
    register(adapters / "ft-0001", "ft-0001", base_model=base, adapter_path="adapters/ft-0001")
    register(adapters / "ft-0002", "ft-0002", base_model=base)
    settings = GatewaySettings(base_model=tiny_model_dir, admin_token=ADMIN, adapters_dir=adapters,
                               sync_interval_s=0.5, max_new_tokens=8, replica_id="swap-test",
                               retry_backoff_s=0.2)
    srv = GatewayServer(settings).start()
    yield {"server": srv, "tmp": tmp_path, "adapters": adapters, "base": base, "model": tiny_model_dir}
    srv.stop()


def admin_status(server) -> dict:
    """The full readiness detail (previous, loaded, last_error): an admin's view."""
    resp = httpx.get(f"{server.url}/admin/status", headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200, resp.text
    return resp.json()


def swap_failures(server) -> float:
    return metric_value(f"{server.url}/metrics", "flywheel_gateway_swap_failures_total")


def model_ids(client) -> set[str]:
    return {m.id for m in client.models.list()}


def admin_sync(server) -> dict:
    resp = httpx.post(f"{server.url}/admin/sync", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


class Traffic:
    """Clients that keep asking (one plain, one streaming) and record every answer with its times."""

    def __init__(self, url: str) -> None:
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=ADMIN, max_retries=0, timeout=60)
        self.stop = threading.Event()
        self.results: list[dict] = []
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._plain), threading.Thread(target=self._stream)]

    def _plain(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                raw = self.client.chat.completions.with_raw_response.create(
                    model="production", messages=MESSAGES, max_tokens=4, temperature=0)
                resp = raw.parse()
                assert raw.headers["X-Flywheel-Model-Version"] == resp.model
                self.results.append({"sent": sent, "done": time.monotonic(), "model": resp.model,
                                     "text": resp.choices[0].message.content, "stream": False})
            except Exception as exc:  # noqa: BLE001 - every failure is a test failure
                self.errors.append(repr(exc))

    def _stream(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                chunks = list(self.client.chat.completions.create(
                    model="production", messages=MESSAGES, max_tokens=4, temperature=0, stream=True))
                models = {c.model for c in chunks}
                assert len(models) == 1, models
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                self.results.append({"sent": sent, "done": time.monotonic(), "model": models.pop(),
                                     "text": text, "stream": True})
            except Exception as exc:  # noqa: BLE001
                self.errors.append(repr(exc))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def wait_for(self, model: str, timeout: float = 60.0) -> None:
        start = len(self.results)
        wait_until(lambda: any(r["model"] == model for r in self.results[start:]), timeout,
                   f"an answer from {model} (errors: {self.errors[:3]})")


def live_versions(timeline: list[tuple[float, float, str]], sent: float, done: float) -> set[str]:
    """Versions that may have been production at some moment of [sent, done]: timeline entries are
    (moved at or after, switched by, new version); before the first entry production was 'base'."""
    live = {"base"} if not timeline or sent < timeline[0][1] else set()
    for i, (start, end, version) in enumerate(timeline):
        next_end = timeline[i + 1][1] if i + 1 < len(timeline) else float("inf")
        if done >= start and sent < next_end:
            live.add(version)
    return live


def test_promote_swap_and_rollback_under_load(env):
    server = env["server"]
    timeline = []
    with Traffic(server.url) as traffic:
        traffic.wait_for("base")
        for target in ("ft-0001", "ft-0002", "ft-0001"):  # the last move is a rollback
            moved = time.monotonic()
            promote(target)
            snapshot = admin_sync(server)
            timeline.append((moved, time.monotonic(), target))
            assert snapshot["production"] == target
            traffic.wait_for(target)
    assert traffic.errors == []
    assert len(traffic.results) > 10
    texts: dict[str, set[str]] = {}
    for r in traffic.results:
        assert r["model"] in live_versions(timeline, r["sent"], r["done"]), r
        texts.setdefault(r["model"], set()).add(r["text"])
    # The version a response names really served it: same greedy text per version, different across them.
    assert set(texts) == {"base", "ft-0001", "ft-0002"}
    assert all(len(t) == 1 for t in texts.values()), texts
    assert len({next(iter(t)) for t in texts.values()}) == 3, texts
    # The previous version stayed loaded, so the rollback needed no load (its time: bench/gateway).
    status = admin_status(server)
    assert status["production"] == "ft-0001" and status["previous"] == "ft-0002"
    assert set(status["loaded"]) == {"ft-0001", "ft-0002"}
    with session_scope() as session:
        replicas = {r.id: r for r in list_replicas(session)}
    assert replicas["swap-test"].served["production"] == "ft-0001"
    assert sorted(replicas["swap-test"].loaded) == ["ft-0001", "ft-0002"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "flywheel_gateway_swaps_total 3.0" in metrics


def test_versions_by_name_and_unloading_of_old_ones(env):
    server = env["server"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, max_retries=0)
    for target in ("ft-0002", "ft-0001"):  # production ft-0001, ft-0002 kept as previous
        promote(target)
        assert admin_sync(server)["production"] == target
    assert client.chat.completions.create(model="ft-0002", messages=MESSAGES, max_tokens=2).model == "ft-0002"
    assert {"base", "production", "ft-0001", "ft-0002"} <= model_ids(client)
    promote(None)  # back to the base model: ft-0001 stays as previous, ft-0002 drains and goes
    admin_sync(server)
    wait_until(lambda: "ft-0002" not in model_ids(client), 30, "ft-0002 to be unloaded")
    assert model_ids(client) == {"base", "production", "ft-0001"}
    assert client.chat.completions.create(model="production", messages=MESSAGES, max_tokens=2).model == "base"
    # Asked for by its immutable name, a registered version is loaded on request...
    assert client.chat.completions.create(model="ft-0002", messages=MESSAGES, max_tokens=2).model == "ft-0002"
    assert model_ids(client) == {"base", "production", "ft-0001", "ft-0002"}
    # ...while names that are not registered versions stay 404s.
    for name in ("ft-9999", "../ft-0002", "production-2", "FT-0002"):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2)
        assert info.value.code == "model_not_found"


def test_polling_alone_picks_up_a_promotion(env):
    server = env["server"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, max_retries=0)
    assert client.chat.completions.create(model="production", messages=MESSAGES, max_tokens=1).model == "base"
    promote("ft-0002")  # no /admin/sync: the 0.5 s poll must notice
    wait_until(lambda: client.chat.completions.create(model="production", messages=MESSAGES,
                                                      max_tokens=1).model == "ft-0002",
               60, "the sync loop to pick up the promotion")


def _expect_refused(env, name: str, fragment: str) -> None:
    server = env["server"]
    serving = httpx.get(f"{server.url}/readyz").json()["production"]
    failures = swap_failures(server)
    promote(name)
    snapshot = admin_sync(server)
    assert snapshot["production"] == serving, snapshot
    assert fragment in snapshot["last_error"], snapshot["last_error"]
    assert swap_failures(server) >= failures + 1  # the refused load is counted
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, max_retries=0)
    assert client.chat.completions.create(model="production", messages=MESSAGES, max_tokens=2).model == serving
    assert httpx.get(f"{server.url}/readyz").status_code == 200  # still serving: still ready
    assert fragment in admin_status(server)["last_error"]
    assert name not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError) as info:  # nor can it be loaded by name
        client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=2)
    assert info.value.code == "model_unavailable" and fragment in info.value.message
    with session_scope() as session:
        replica = {r.id: r for r in list_replicas(session)}["swap-test"]
    assert replica.served["production"] == serving and fragment in replica.last_error


def test_broken_adapters_are_refused_and_the_old_version_keeps_serving(env):
    tmp, adapters, base = env["tmp"], env["adapters"], env["base"]
    promote("ft-0001")  # a replica serving a version it swapped to: it stays ready through refusals
    assert admin_sync(env["server"])["production"] == "ft-0001"
    # 1. a path outside the adapters directory (absolute, and via ..)
    outside = make_adapter(env["model"], tmp / "elsewhere" / "ft-0003", seed=3)
    register(outside, "ft-0003", base_model=base)
    _expect_refused(env, "ft-0003", "outside the adapters directory")
    shutil.copytree(outside, adapters / "ft-0004")
    register(adapters / "ft-0004", "ft-0004", base_model=base, adapter_path=str(adapters / ".." / "elsewhere" / "ft-0003"))
    _expect_refused(env, "ft-0004", "contains '..'")
    # 2. an adapter registered for another base model
    register(adapters / "ft-0004", "ft-0005", base_model="some-other-model", adapter_path=str(adapters / "ft-0004"))
    _expect_refused(env, "ft-0005", "some-other-model")
    # 3. files changed after registration (sha256 mismatch)
    changed = shutil.copytree(adapters / "ft-0004", adapters / "ft-0006")
    register(changed, "ft-0006", base_model=base)
    with open(changed / "adapter_model.safetensors", "r+b") as fh:
        fh.seek(-16, 2)
        fh.write(b"\0" * 16)
    _expect_refused(env, "ft-0006", "does not match its registered sha256")
    # 4. corrupt files registered as they are (digest matches, PEFT cannot load them)
    corrupt = adapters / "ft-0007"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((adapters / "ft-0004" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"this is not a safetensors file")
    register(corrupt, "ft-0007", base_model=base)
    _expect_refused(env, "ft-0007", "could not load")
    # 5. an adapter directory that is missing
    register(adapters / "ft-0004", "ft-0008", base_model=base, adapter_path=str(adapters / "nothing-here"))
    _expect_refused(env, "ft-0008", "lacks adapter_config.json")
    # A good version promoted afterwards is picked up at once.
    register(adapters / "ft-0004", "ft-0009", base_model=base)
    promote("ft-0009")
    assert admin_sync(env["server"])["production"] == "ft-0009"
    assert admin_sync(env["server"])["last_error"] is None


def test_moving_back_from_a_refused_version_clears_the_error(env):
    server, adapters = env["server"], env["adapters"]
    serving = "ft-0001"
    promote(serving)
    assert admin_sync(server)["production"] == serving
    register(adapters / "ft-0002", "ft-0010", base_model="yet-another-model")
    promote("ft-0010")
    assert "yet-another-model" in admin_sync(server)["last_error"]
    promote(serving)  # the admin moves production back to what this replica still serves
    snapshot = admin_sync(server)
    assert snapshot["production"] == serving and snapshot["last_error"] is None


def test_versions_loaded_by_name_are_capped(env):
    server, adapters, base = env["server"], env["adapters"], env["base"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, max_retries=0)
    names = ["ft-0011", "ft-0012", "ft-0013"]
    for name in names:
        register(shutil.copytree(adapters / "ft-0001", adapters / name), name, base_model=base)
    for name in names:
        assert client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=1).model == name
    wait_until(lambda: "ft-0011" not in model_ids(client), 30, "ft-0011 to be unloaded")
    loaded = model_ids(client)
    assert {"ft-0012", "ft-0013"} <= loaded  # max_extra_versions=2, the least recently used went
    assert httpx.get(f"{server.url}/readyz").json()["production"] == "base"
