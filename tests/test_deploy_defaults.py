"""Deployment defaults fail closed: the gateway will not serve a reachable address without API
keys (unless --insecure), compose and Kubernetes carry no default secrets, vLLM is reachable from
the gateways only and wants a key, images are pinned and run as a non-root user."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def _k8s_docs() -> list[dict]:
    return [d for p in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def _pod_specs():
    for doc in _k8s_docs():
        spec = doc.get("spec", {})
        pod = spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get("template")
        if pod:
            yield doc["metadata"]["name"], pod["spec"]


def test_serve_refuses_a_reachable_address_without_api_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_API_KEYS"}
    env["FLYWHEEL_BASE_MODEL"] = str(tmp_path / "no-model")  # never loaded: it must stop before
    out = subprocess.run([sys.executable, "-m", "flywheel", "gateway", "serve", "--host", "0.0.0.0", "--port", "1"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "FLYWHEEL_API_KEYS" in out.stderr and "--insecure" in out.stderr


def test_which_binds_need_keys():
    from gateway.commands import exposure_error

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_error(host, []) is None, host
    for host in ("0.0.0.0", "::", "10.0.0.5", "gateway.internal"):
        assert exposure_error(host, []) is not None, host
        assert exposure_error(host, ["k"]) is None and exposure_error(host, [], insecure=True) is None


def test_example_placeholders_are_refused_as_secrets():
    from gateway.settings import GatewaySettings

    for field in ("api_keys", "admin_token", "vllm_api_key"):
        with pytest.raises(ValidationError, match="placeholder"):
            GatewaySettings(**{field: "CHANGE_ME"})


def test_compose_has_no_default_secrets_and_fences_vllm_in():
    text = (DEPLOY / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    # ${VAR:-default} would start with a known password; every secret must be ${VAR:?message}.
    for var in ("POSTGRES_PASSWORD", "FLYWHEEL_API_KEYS", "FLYWHEEL_ADMIN_TOKEN", "VLLM_API_KEY",
                "FLYWHEEL_GATEWAY_API_KEY"):
        uses = re.findall(r"\$\{" + var + r"(:?[-?])?", text)
        assert uses and all(u == ":?" for u in uses), (var, uses)
    services = compose["services"]
    vllm, gateway = services["vllm"], services["gateway"]
    assert "ports" not in vllm and vllm["networks"] == ["inference"]
    assert compose["networks"]["inference"]["internal"] is True
    on_inference = {name for name, svc in services.items() if "inference" in (svc.get("networks") or [])}
    assert on_inference == {"vllm", "gateway"}
    assert "VLLM_API_KEY" in vllm["environment"] and "FLYWHEEL_VLLM_API_KEY" in gateway["environment"]
    for name, svc in services.items():
        if "image" in svc:
            image = svc["image"].split("#")[0].strip()
            assert re.search(r":v?\d+\.\d+", image) and not image.endswith(":latest"), (name, image)
    assert vllm.get("user") and not str(vllm["user"]).startswith("0")


def test_dockerfile_is_pinned_and_unprivileged():
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    base = next(ln for ln in lines if ln.startswith("FROM "))
    if "${BASE_IMAGE}" in base:  # the base is a build argument: its default must be pinned
        base = next(ln for ln in lines if ln.startswith("ARG BASE_IMAGE="))
    assert re.search(r":\d+\.\d+\.\d+", base), base
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert lines.index(f"USER {users[-1]}") > max(i for i, ln in enumerate(lines) if ln.startswith("RUN "))


def test_dockerfile_gives_the_user_a_writable_working_directory():
    """The trainer writes FLYWHEEL_DATA_DIR and FLYWHEEL_RUNS_DIR (default ./data, ./runs): the image
    points them at a folder uid 10001 owns, which is also the working directory."""
    text = (DEPLOY / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR (\S+)", text, re.MULTILINE)[-1]
    assert re.search(rf"chown 10001:10001 .*{re.escape(workdir)}", text), workdir
    for name in ("FLYWHEEL_DATA_DIR", "FLYWHEEL_RUNS_DIR"):
        assert re.search(rf"{name}={re.escape(workdir)}/", text), name


def test_kubernetes_pods_run_unprivileged_pinned_images():
    specs = dict(_pod_specs())
    assert {"flywheel-bot", "flywheel-gateway", "flywheel-vllm", "flywheel-trainer", "flywheel-migrate",
            "flywheel-postgres"} <= set(specs)
    for name, spec in specs.items():
        for container in spec["containers"] + spec.get("initContainers", []):
            image = container["image"]
            assert re.search(r":v?\d+\.\d+", image) and not image.endswith(":latest"), (name, image)
            context = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True and context.get("allowPrivilegeEscalation") is False, name


def _component(name: str) -> dict:
    return {"app.kubernetes.io/name": "flywheel", "app.kubernetes.io/instance": "flywheel",
            "app.kubernetes.io/component": name}


def _policies_for(component: str) -> list[dict]:
    return [d for d in _k8s_docs() if d["kind"] == "NetworkPolicy"
            and d["spec"]["podSelector"] == {"matchLabels": _component(component)}]


def test_kubernetes_lets_only_gateways_reach_vllm_with_a_key():
    policies = _policies_for("vllm")
    assert len(policies) == 1
    ingress = policies[0]["spec"]["ingress"]
    assert "Ingress" in policies[0]["spec"]["policyTypes"]
    assert [src for rule in ingress for src in rule["from"]] == [{"podSelector": {"matchLabels": _component("gateway")}}]
    vllm = dict(_pod_specs())["flywheel-vllm"]["containers"][0]
    key = next(e for e in vllm["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "flywheel-vllm", "key": "VLLM_API_KEY"}
    secrets = {d["metadata"]["name"]: d["stringData"] for d in _k8s_docs() if d["kind"] == "Secret"}
    gateway = secrets["flywheel-gateway"]
    assert gateway["FLYWHEEL_API_KEYS"] and gateway["FLYWHEEL_VLLM_API_KEY"]  # no empty (open) defaults
    assert secrets["flywheel-vllm"]["VLLM_API_KEY"]


def test_kubernetes_fences_in_the_gateway_and_the_database():
    """The gateway answers the bot and the trainer (and the metrics scraper); PostgreSQL answers
    the components that use the store. Nothing else in the cluster reaches either."""
    for component, clients, port in (("gateway", ["bot", "trainer"], 8000),
                                     ("postgres", ["gateway", "bot", "trainer", "migrate"], 5432)):
        policies = _policies_for(component)
        assert len(policies) == 1, component
        spec = policies[0]["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
        peers = [p for p in rule["from"] if "podSelector" in p]
        assert len(peers) == 1, component
        selector = peers[0]["podSelector"]
        assert selector["matchLabels"] == {"app.kubernetes.io/name": "flywheel", "app.kubernetes.io/instance": "flywheel"}
        assert selector["matchExpressions"] == [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": clients}], component
        others = [p for p in rule["from"] if "podSelector" not in p]
        assert all(set(p) == {"namespaceSelector"} and p["namespaceSelector"] for p in others), others
