"""The deployment files parse, run commands that exist, and set only settings the code reads."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flywheel.app.cli import app

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SETTINGS = ["store.settings:StoreSettings", "gateway.settings:GatewaySettings",
            "trainer.settings:TrainerSettings", "bot.settings:BotSettings", "flywheel.prompt:PromptSettings",
            "flywheel.memory:MemorySettings"]
# Read by libraries or by vLLM / PostgreSQL images rather than by our settings classes.
FOREIGN = {"FLYWHEEL_LOG_JSON", "FLYWHEEL_LOG_LEVEL", "FLYWHEEL_REPLICA_ID", "HF_HUB_OFFLINE",
           "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}


def _documents():
    """Every YAML file but the chart's templates (Go templates; tests/test_deploy_chart.py renders them)."""
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        if "templates" in path.relative_to(DEPLOY).parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def _env_names_known() -> set[str]:
    names = set()
    for spec in SETTINGS:
        module, cls = spec.split(":")
        settings = getattr(importlib.import_module(module), cls)
        prefix = settings.model_config.get("env_prefix", "")
        for name, field in settings.model_fields.items():
            names.add((prefix + name).upper())
            for alias in (field.validation_alias, field.alias):
                if isinstance(alias, str):
                    names.add(alias.upper())
                elif alias is not None and hasattr(alias, "choices"):
                    names.update(str(c).upper() for c in alias.choices)
    return names


def _flywheel_invocations():
    """(file, argv) for every container or service that runs the flywheel command."""
    for path, doc in _documents():
        if path.name == "docker-compose.yml":
            for name, svc in doc.get("services", {}).items():
                if "build" in svc:
                    yield path.name, svc.get("command", [])
        else:
            spec = doc.get("spec", {})
            pod = (spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get("template") or {})
            containers = pod.get("spec", {}).get("containers", []) + pod.get("spec", {}).get("initContainers", [])
            for container in containers:  # those with a command of their own run something else
                if container.get("image", "").startswith("flywheel") and not container.get("command"):
                    yield path.name, container.get("args", [])


def test_every_yaml_file_parses_and_k8s_objects_have_kind():
    docs = list(_documents())
    assert len(docs) >= 8
    for path, doc in docs:
        if path.parent.name == "k8s":
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"]["name"], path


@pytest.mark.parametrize("where,argv", list(_flywheel_invocations()))
def test_deploy_commands_exist(where, argv):
    assert argv, f"{where}: a flywheel container without a command"
    options = [a for a in argv if a.startswith("--")]
    result = CliRunner().invoke(app, [*[a for a in argv if not a.startswith("-")][:2], "--help"])
    assert result.exit_code == 0, f"{where}: `flywheel {' '.join(argv)}` is not a command: {result.output}"
    for opt in options:
        assert opt in result.output, f"{where}: {opt} is not an option of `flywheel {' '.join(argv[:2])}`"


def test_deploy_sets_only_settings_the_code_reads():
    known = _env_names_known() | FOREIGN
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file())
    used = set(re.findall(r"\b((?:FLYWHEEL|SLACK)_[A-Z0-9_]+)\b", text))
    assert used, "no settings referenced"
    assert used <= known, f"settings no code reads: {sorted(used - known)}"


def test_compose_gives_each_service_what_it_needs():
    """The trainer writes to a volume of its own, the bot reads the embedder from the models
    volume, and the model path, GPU count and LoRA rank are each set once."""
    text = (DEPLOY / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    trainer, bot, vllm = services["trainer"], services["bot"], services["vllm"]
    mounts = {v.split(":")[1]: v for v in trainer["volumes"]}
    for name in ("FLYWHEEL_DATA_DIR", "FLYWHEEL_RUNS_DIR"):
        where = trainer["environment"][name]
        mount = next(m for path, m in mounts.items() if where.startswith(path + "/"))
        assert not mount.endswith(":ro"), name
    assert "models:/models:ro" in bot["volumes"]
    assert bot["command"][bot["command"].index("--host") + 1] == "0.0.0.0" and "healthcheck" in bot
    model = vllm["command"][vllm["command"].index("--model") + 1]
    assert model == trainer["environment"]["FLYWHEEL_BASE_MODEL"] == services["gateway"]["environment"]["FLYWHEEL_BASE_MODEL"]
    assert text.count("/models/smollm2-135m-instruct") == 1 + text.count("--target /models/smollm2")  # the anchor (and the comment)
    assert "--tensor-parallel-size=${VLLM_GPUS:-1}" in vllm["command"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "${VLLM_GPUS:-1}"
    assert "--max-lora-rank=${LORA_RANK:-16}" in vllm["command"]
    assert trainer["environment"]["FLYWHEEL_LORA_R"] == "${LORA_RANK:-16}"
    assert vllm.get("shm_size")
    for name in ("bot", "gateway", "vllm"):
        assert services[name]["deploy"]["resources"]["limits"]["memory"], name


def test_docker_build_context_holds_what_the_dockerfile_copies_and_no_more():
    """.dockerignore keeps the context to the sources (no .venv, models or .git, gigabytes)."""
    root = DEPLOY.parent
    ignore = [ln.strip() for ln in (root / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*"
    allowed = {ln[1:] for ln in ignore if ln.startswith("!")}
    copied = set()
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied.update(line.split()[1:-1])
    assert copied and copied <= allowed, copied - allowed
