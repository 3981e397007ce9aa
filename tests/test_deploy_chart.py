"""The Helm chart (deploy/helm/flywheel), rendered by Helm's own engine: every manifest validates
against the Kubernetes schema, the fail-closed rules hold for the defaults and for a large
deployment alike, each value reaches every place that depends on it, and deploy/k8s/ is the
chart's render."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import helm_python as helm  # dev extra: Helm's template engine (no helm binary)
import kubernetes_validate  # dev extra: the Kubernetes schemas, bundled
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
HELM = ROOT / "deploy" / "helm"
KUBE_VERSIONS = ("1.29.0", "1.33.0")  # oldest and newest schema we promise to validate against

spec = importlib.util.spec_from_file_location("flywheel_chart_render", HELM / "render.py")
render_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render_module)

# A 7B from the Hub on 3 vLLM pods of 2 GPUs, a rank-64 LoRA, a trainer on 2 GPUs behind a
# launcher, an external database, the bot on the Events API, the gateway's secret managed outside.
LARGE = {
    "model": {"dir": "qwen2.5-7b-instruct", "hubId": "Qwen/Qwen2.5-7B-Instruct", "revision": "main",
              "maxModelLen": 8192},
    "lora": {"rank": 64},
    "vllm": {"replicas": 3, "gpusPerPod": 2, "shmSize": "16Gi"},
    "gateway": {"replicas": 4, "existingSecret": "my-gateway-secret"},
    "bot": {"mode": "http", "admins": "U1,U2"},
    "trainer": {"gpus": 2, "launcher": ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "flywheel"]},
    "database": {"enabled": False},
    "storage": {"models": "100Gi"},
    "secrets": {"databaseUrl": "postgresql+psycopg://flywheel:pw@db.example.internal:5432/flywheel",
                "hfToken": "hf_example"},
    "monitoring": {"grafanaDashboard": True, "prometheusRule": True, "ruleLabels": {"release": "prometheus"}},
}
CRDS = {"monitoring.coreos.com/v1"}  # the Prometheus Operator's: no schema in kubernetes-validate
VARIANTS = {"defaults": {}, "large": LARGE}
OWN_SECRET_KEYS = {  # what each component's Secret may hold: no pod sees another one's secrets
    "gateway": {"FLYWHEEL_DATABASE_URL", "FLYWHEEL_API_KEYS", "FLYWHEEL_ADMIN_TOKEN", "FLYWHEEL_VLLM_API_KEY"},
    "bot": {"FLYWHEEL_DATABASE_URL", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET",
            "FLYWHEEL_GATEWAY_API_KEY", "FLYWHEEL_GATEWAY_ADMIN_TOKEN"},
    "trainer": {"FLYWHEEL_DATABASE_URL", "FLYWHEEL_GATEWAY_API_KEY"},
    "migrate": {"FLYWHEEL_DATABASE_URL"},
    "vllm": {"VLLM_API_KEY"},
    "postgres": {"POSTGRES_PASSWORD"},
    "model-fetch": {"HF_TOKEN"},
}


def _render(values: dict, release: str = "flywheel") -> list[dict]:
    files = render_module.render(values, release=release)
    return [d for text in files.values() for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module", params=list(VARIANTS))
def rendered(request) -> tuple[dict, list[dict]]:
    values = VARIANTS[request.param]
    return values, _render(values)


def _merged(values: dict) -> dict:
    defaults = yaml.safe_load((HELM / "flywheel" / "values.yaml").read_text())

    def merge(a, b):
        return {k: merge(a[k], b[k]) if isinstance(a.get(k), dict) and isinstance(b.get(k), dict) else b.get(k, a.get(k))
                for k in a | b}
    return merge(defaults, values)


def _component(doc: dict) -> str:
    return doc["metadata"]["labels"]["app.kubernetes.io/component"]


def _pods(docs: list[dict]) -> dict[str, dict]:
    """component → pod spec, for every workload."""
    out = {}
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get("template")
        if pod:
            out[_component(doc)] = pod["spec"]
    return out


def _kind(docs, kind, component=None):
    return [d for d in docs if d["kind"] == kind and (component is None or _component(d) == component)]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _container(pods, component):
    return pods[component]["containers"][0]


def _flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return value


def _gi(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|Ti)", quantity).groups()
    return float(number) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[unit]


def test_the_chart_lints_clean():
    for values in VARIANTS.values():
        assert helm.lint(str(HELM / "flywheel"), values, strict=True)["errors"] == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_rendered_manifest_validates_against_the_kubernetes_schema(rendered, version):
    _, docs = rendered
    assert len(docs) >= 15
    for doc in docs:
        if doc["apiVersion"] in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}")


def test_pods_run_unprivileged_pinned_images(rendered):
    _, docs = rendered
    pods = _pods(docs)
    assert {"gateway", "bot", "trainer", "migrate", "vllm"} <= set(pods)
    for name, pod in pods.items():
        for container in pod["containers"] + pod.get("initContainers", []):
            image = container["image"]
            assert re.search(r":v?\d+\.\d+", image) and not image.endswith(":latest"), (name, image)
            context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True and context.get("allowPrivilegeEscalation") is False, name
            assert context.get("runAsUser") not in (None, 0), name
            assert context.get("capabilities") == {"drop": ["ALL"]}, name


def test_each_pod_reads_only_its_own_secret(rendered):
    values, docs = rendered
    pods = _pods(docs)
    secrets = {d["metadata"]["name"]: d for d in _kind(docs, "Secret")}
    for component, pod in pods.items():
        for container in pod["containers"] + pod.get("initContainers", []):
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
                     if "secretKeyRef" in e.get("valueFrom", {})]
            assert not any("configMapRef" in e for e in container.get("envFrom", [])), component
            own = (values.get(component) or {}).get("existingSecret") or f"flywheel-{component}"
            assert set(refs) <= {own}, (component, refs)
    for name, secret in secrets.items():
        keys = set(secret["stringData"])
        assert keys <= OWN_SECRET_KEYS[_component(secret)], (name, keys - OWN_SECRET_KEYS[_component(secret)])
    if "flywheel-trainer" in secrets:
        assert not any(k.startswith("SLACK_") for k in secrets["flywheel-trainer"]["stringData"])
    # Every key a client uses is one the gateway accepts.
    if "flywheel-gateway" in secrets:
        accepted = secrets["flywheel-gateway"]["stringData"]["FLYWHEEL_API_KEYS"].split(",")
        for client in ("bot", "trainer"):
            assert secrets[f"flywheel-{client}"]["stringData"]["FLYWHEEL_GATEWAY_API_KEY"] in accepted


def test_the_trainer_writes_to_its_own_volume(rendered):
    """FLYWHEEL_DATA_DIR and FLYWHEEL_RUNS_DIR sit on a writable mount (not the image's root-owned
    /app), the adapters too; the pod's fsGroup makes them uid 10001's."""
    _, docs = rendered
    pod = _pods(docs)["trainer"]
    trainer = pod["containers"][0]
    env = _env(trainer)
    mounts = {m["mountPath"]: m for m in trainer["volumeMounts"]}
    for name in ("FLYWHEEL_DATA_DIR", "FLYWHEEL_RUNS_DIR", "FLYWHEEL_ADAPTERS_DIR"):
        mount = next(m for path, m in mounts.items() if env[name].startswith(path))
        assert not mount.get("readOnly"), name
    assert mounts["/models"]["readOnly"] is True
    assert pod["securityContext"]["fsGroup"] == 10001
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims[mounts["/var/lib/flywheel"]["name"]] == "flywheel-trainer-work"


def test_a_hung_trainer_is_ended_and_weighs_the_bots_admins(rendered):
    """The trainer's Job has a deadline (the backstop behind its own stall check, which must come
    well before it) and reads the bot's admins (admin weight is decided at training time)."""
    from trainer.settings import TrainerSettings

    values, docs = rendered
    merged = _merged(values)
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    deadline = cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    env = _env(_container(_pods(docs), "trainer"))
    assert deadline == merged["trainer"]["activeDeadlineSeconds"]
    assert TrainerSettings(stall_s=env["FLYWHEEL_STALL_S"]).stall_s * 4 <= deadline
    assert TrainerSettings(admins=env["FLYWHEEL_ADMINS"]).admins == [a for a in merged["bot"]["admins"].split(",") if a]


def test_the_bot_has_its_memory_health_probes_and_a_reachable_address(rendered):
    _, docs = rendered
    bot = _container(_pods(docs), "bot")
    args = bot["args"]
    assert args[:2] == ["bot", "serve"] and args[args.index("--host") + 1] == "0.0.0.0"
    port = int(args[args.index("--port") + 1])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert bot[probe]["httpGet"] == {"path": "/healthz", "port": port}, probe
    models = next(m for m in bot["volumeMounts"] if m["mountPath"] == "/models")
    assert models["readOnly"] is True
    assert _env(bot)["FLYWHEEL_EMBED_MODEL"].startswith("/models/")


def test_bot_gateway_and_vllm_have_requests_and_limits(rendered):
    _, docs = rendered
    pods = _pods(docs)
    for component in ("bot", "gateway", "vllm", "trainer", "postgres" if "postgres" in pods else "bot"):
        resources = _container(pods, component)["resources"]
        assert resources["requests"].get("cpu") and resources["requests"].get("memory"), component
        assert resources["limits"].get("memory"), component


def test_one_model_path_everywhere_and_room_for_a_7b(rendered):
    values, docs = rendered
    merged = _merged(values)
    path = f"/models/{merged['model']['dir']}"
    pods = _pods(docs)
    for component in ("gateway", "trainer", "bot"):
        assert _env(_container(pods, component))["FLYWHEEL_BASE_MODEL"] == path, component
    vllm = pods["vllm"]
    assert _flag(vllm["containers"][0]["args"], "model") == path
    assert path in vllm["initContainers"][0]["command"]
    fetch = _container(pods, "model-fetch")
    assert path in (fetch.get("command") or []) + fetch.get("args", [])
    if merged["model"]["hubId"]:
        assert fetch["command"][:3] == ["hf", "download", merged["model"]["hubId"]]
    (models,) = [d for d in _kind(docs, "PersistentVolumeClaim") if d["metadata"]["name"] == "flywheel-models"]
    assert _gi(models["spec"]["resources"]["requests"]["storage"]) >= 40
    assert models["spec"]["accessModes"] == ["ReadWriteMany"]


def test_vllm_pods_are_named_gpu_sized_and_all_known_to_the_gateway(rendered):
    from gateway.settings import GatewaySettings

    values, docs = rendered
    merged = _merged(values)
    (sts,) = _kind(docs, "StatefulSet", "vllm")
    (svc,) = _kind(docs, "Service", "vllm")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    replicas, gpus = sts["spec"]["replicas"], merged["vllm"]["gpusPerPod"]
    assert replicas == merged["vllm"]["replicas"]
    pod = sts["spec"]["template"]["spec"]
    vllm = pod["containers"][0]
    assert int(_flag(vllm["args"], "tensor-parallel-size")) == gpus
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == gpus
    shm = next(m for m in vllm["volumeMounts"] if m["mountPath"] == "/dev/shm")
    (volume,) = [v for v in pod["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"

    gateway = _env(_container(_pods(docs), "gateway"))
    name = sts["metadata"]["name"]
    expected = [f"http://{name}-{i}.{svc['metadata']['name']}:8000" for i in range(replicas)]
    assert GatewaySettings(backend="vllm", vllm_urls=gateway["FLYWHEEL_VLLM_URLS"]).vllm_urls == expected


def test_lora_rank_is_one_value_for_trainer_and_vllm(rendered):
    from trainer.settings import TrainerSettings

    values, docs = rendered
    pods = _pods(docs)
    rank = int(_flag(_container(pods, "vllm")["args"], "max-lora-rank"))
    trainer_env = _env(_container(pods, "trainer"))
    assert TrainerSettings(lora_r=trainer_env["FLYWHEEL_LORA_R"]).lora_r == rank == _merged(values)["lora"]["rank"]


def test_network_policies_fence_vllm_gateway_and_database(rendered):
    values, docs = rendered
    policies = {d["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]: d
                for d in _kind(docs, "NetworkPolicy")}
    expected = {"vllm", "gateway"} | ({"postgres"} if _merged(values)["database"]["enabled"] else set())
    assert set(policies) == expected
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"] and policy["spec"]["ingress"]


@pytest.mark.parametrize("values,message", [
    ({"lora": {"rank": 24}}, "max-lora-rank"),
    ({"trainer": {"gpus": 4}}, "trainer.launcher"),
    ({"model": {"dir": "Qwen/Qwen2.5-7B-Instruct"}}, "model.hubId"),
    ({"database": {"enabled": False}}, "secrets.databaseUrl"),
    ({"bot": {"mode": "websocket"}}, "bot.mode"),
])
def test_the_chart_refuses_values_that_cannot_work(values, message):
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render_module.render(values)


def test_the_chart_ships_the_dashboard_and_the_alert_rules():
    import json

    docs = _render(LARGE)
    files = HELM / "flywheel" / "files"
    (dashboard,) = _kind(docs, "ConfigMap", "dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["flywheel.json"]) == json.loads((files / "grafana-dashboard.json").read_text())
    (rule,) = _kind(docs, "PrometheusRule", "alerts")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load((files / "prometheus-rules.yml").read_text())
    other = _render({"monitoring": {"prometheusRule": True, "grafanaDashboard": True}}, release="team-a")
    (rule,) = _kind(other, "PrometheusRule", "alerts")
    assert "team-a-trainer" in json.dumps(rule["spec"]) and "flywheel-trainer" not in json.dumps(rule["spec"])
    assert not _kind(_render({}), "PrometheusRule") and not _kind(_render({}), "ConfigMap")


def test_deploy_k8s_is_the_charts_render():
    assert render_module.main(["--check"]) == 0, "deploy/k8s/ is out of date: run `make k8s`"
