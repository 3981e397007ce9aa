"""The shortened demo on the production backend: the whole week (bot, gateway in front of a real
vLLM CPU server, trainer, gate, promotion, hot swap of the LoRA adapter into vLLM) on three facts
and a tiny model, so `make test` proves the vLLM path end to end and not only route by route."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flywheel.modelfiles import build_tiny_llama, default_embedder_dir
from gateway.vllm_server import vllm_available, vllm_python

pytestmark = pytest.mark.slow


def test_shortened_demo_on_vllm(base_model_dir, tmp_path):
    if not vllm_available():
        pytest.skip("vLLM is not installed: run `make vllm`")
    model = build_tiny_llama(tmp_path / "tiny-untied", base_model_dir, tie_embeddings=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "SLACK_"))}
    env.update({"FLYWHEEL_VLLM_PYTHON": str(vllm_python().absolute()),
                "FLYWHEEL_EMBED_MODEL": str(default_embedder_dir().resolve()), "FLYWHEEL_EPOCHS": "20",
                "FLYWHEEL_LEARNING_RATE": "5e-3", "FLYWHEEL_WARMUP_RATIO": "0", "FLYWHEEL_GATE_MIN_EVAL_ITEMS": "1",
                "FLYWHEEL_MIN_TRAIN_EXAMPLES": "2", "FLYWHEEL_GATE_MAX_LOSS_RATIO": "3.0",
                "FLYWHEEL_GATE_MARGIN": "-1", "FLYWHEEL_GATE_REGRESSION_TOLERANCE": "1"})
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "flywheel", "demo", "run", "--backend", "vllm", "--facts", "3",
                          "--paraphrases", "1", "--model", str(model), "--output", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["asked"]["n"] == 3 and saved["version"]["gate_passed"]
    assert saved["refused_by_slack"] == []
    gateway_log = (out / "logs" / "gateway.log").read_text()
    assert "vllm_connected" in gateway_log  # the gateway served from vLLM, not from its own model
    # the promoted adapter was loaded into vLLM and became production there
    assert f"production={saved['version']['name']}" in gateway_log, gateway_log[-2000:]
