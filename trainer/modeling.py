"""Loading the base model, wrapping it with LoRA, and the answer-only loss.

The loss runs the LM head only on the positions that have a target: the vocabulary projection
(49k columns for SmolLM2) on prompt and padding positions is pure waste in compute and memory."""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.encode import IGNORE


class ModelLoadError(RuntimeError):
    """The base model directory is missing or unreadable; the message says what to do."""


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("FLYWHEEL_DEVICE asks for cuda but no GPU is visible")
    return torch.device(setting)


def use_bf16(device: torch.device, setting: bool | None) -> bool:
    if setting is not None:
        return bool(setting) and (device.type != "cuda" or torch.cuda.is_bf16_supported())
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    _check_dir(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(model_dir: str | Path, device: torch.device):
    """Weights in float32 (LoRA on CPU wants it; on GPU bf16 autocast does the speed-up)."""
    from transformers import AutoModelForCausalLM

    _check_dir(model_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    return model.to(device)


def _check_dir(model_dir) -> None:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"base model {path} not found (no config.json); run `make model` or set FLYWHEEL_BASE_MODEL")


def add_lora(model, settings):
    """LoRA on linear layers only, no modules_to_save: loads as is in PEFT and in vLLM."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=settings.target_module_list(), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def causal_lm_parts(model):
    """(decoder stack, lm_head) of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


def answer_loss(model, batch: dict[str, torch.Tensor], *, reduction: str = "sum") -> tuple[torch.Tensor, int]:
    """Cross-entropy over target tokens only; returns (loss, number of target tokens)."""
    decoder, head = causal_lm_parts(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    picked = hidden[:, :-1][keep]
    logits = head(picked).float()
    loss = F.cross_entropy(logits, targets[keep], reduction=reduction)
    return loss, int(keep.sum())
