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
    for path in sorted(DEPLOY.rglob("*.y*ml")):
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
    """(file, argv) for every container or service that runs the flywheel image."""
    for path, doc in _documents():
        if path.name == "docker-compose.yml":
            for name, svc in doc.get("services", {}).items():
                if "build" in svc:
                    yield path.name, svc.get("command", [])
        else:
            spec = doc.get("spec", {})
            pod = (spec.get("jobTemplate", {}).get("spec", {}).get("template") or spec.get("template") or {})
            for container in pod.get("spec", {}).get("containers", []):
                if container.get("image", "").startswith("flywheel"):
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
