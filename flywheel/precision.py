"""bf16 for generation on CPU, one switch for the gateway (what production serves) and the
trainer's evaluator (what the gate scores), so both compute answers the same way.

Measured on the first 24 demo questions (bench/serving/bf16.py --quick, SmolLM2, 2 cores with
AVX-512 BF16): bf16 autocast generates 1.8x faster one question at a time and 2.4x sixteen at a time, equally
close to the true answers (token F1 0.134 vs 0.140), but greedy decoding then gives a different
answer than fp32 for about half the questions. Off by default: the gate's scores and every
result recorded so far are fp32's; FLYWHEEL_INFERENCE_BF16=1 takes the speed on both sides."""
from __future__ import annotations

from contextlib import nullcontext


def inference_autocast(device, enabled: bool):
    """bf16 autocast around generation on a CPU when enabled (GPUs already serve bf16 weights)."""
    import torch

    if enabled and str(device).startswith("cpu"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()
