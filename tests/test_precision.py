"""FLYWHEEL_INFERENCE_BF16: one switch for how answers are computed, read the same way by the
gateway (what production serves) and the trainer's evaluator (what the gate scores)."""
from __future__ import annotations

import torch

from flywheel.precision import inference_autocast
from gateway.settings import GatewaySettings
from trainer.modeling import load_base_model
from trainer.settings import TrainerSettings


def test_off_by_default_and_read_alike_by_gateway_and_trainer(monkeypatch):
    assert GatewaySettings().inference_bf16 is False and TrainerSettings().inference_bf16 is False
    monkeypatch.setenv("FLYWHEEL_INFERENCE_BF16", "1")
    assert GatewaySettings().inference_bf16 is True and TrainerSettings().inference_bf16 is True


def test_generation_runs_in_bf16_on_cpu_only_when_asked(tiny_model_dir):
    model = load_base_model(tiny_model_dir, torch.device("cpu")).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    dtypes = {}
    for enabled in (False, True):
        with torch.inference_mode(), inference_autocast(torch.device("cpu"), enabled):
            dtypes[enabled] = model(input_ids=ids).logits.dtype
    assert dtypes == {False: torch.float32, True: torch.bfloat16}
    with inference_autocast("cuda:0", True):  # GPUs serve bf16 weights already: nothing to add
        assert not torch.is_autocast_enabled("cpu")
