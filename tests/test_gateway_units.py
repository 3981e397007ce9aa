"""Small pieces of the gateway: settings parsing, stop-sequence trimming, adapter path checks."""
from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from flywheel.adapters import AdapterError
from gateway.settings import GatewaySettings
from gateway.stops import StopTrimmer
from gateway.sync import resolve_adapter_path


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
