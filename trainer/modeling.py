"""Loading the base model for training, wrapping it with LoRA, and the answer-only loss.

The loss runs the LM head only on the positions that have a target: the vocabulary projection
(49k columns for SmolLM2) on prompt and padding positions is pure waste in compute and memory."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from flywheel.basemodel import ModelLoadError, load_causal_lm, load_tokenizer  # noqa: F401 (re-exported for callers)
from flywheel.logs import get_logger
from trainer.encode import IGNORE

log = get_logger("trainer.modeling")
# Bytes per parameter of LoRA training state besides the weights: the fp32 gradient and AdamW's
# two fp32 moments, allocated at the first step (after the memory estimate below is made).
LORA_STATE_BYTES = 12


def pick_device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("FLYWHEEL_DEVICE asks for cuda but no GPU is visible")
    return torch.device(setting)


def cpu_has_bf16() -> bool:
    """AVX-512 BF16 or AMX: a bf16 matmul runs ~4x faster than fp32 here, LoRA training ~1.7x
    (bench/trainer/results.md); without them bf16 is emulated and slower, so fp32 stays."""
    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def use_bf16(device: torch.device, setting: bool | None) -> bool:
    """bf16 autocast for training: FLYWHEEL_BF16 if set, else wherever the hardware does it natively."""
    if setting is not None:
        return bool(setting) and (device.type != "cuda" or torch.cuda.is_bf16_supported())
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def use_checkpointing(device: torch.device, setting: bool | None) -> bool | None:
    """Activation checkpointing: True always, False never, None (FLYWHEEL_ACTIVATION_CHECKPOINTING
    unset) decided per micro-batch by Checkpointing: on CPU for micro-batches over
    checkpoint_above_tokens, on a CUDA GPU for those whose activations would not fit in its free
    memory (gpu_checkpoint_above); never on other devices."""
    if setting is not None:
        return bool(setting)
    return None if device.type in ("cpu", "cuda") else False


def activation_bytes_per_token(config, elem_bytes: int) -> int:
    """Activations one token keeps for backward without checkpointing, estimated for a decoder
    LM with LoRA on every linear layer: per layer ~18 hidden-sized tensors (norms, attention
    inputs and outputs, residuals, the LoRA dropout copies of each adapted layer's input) and 4
    intermediate-sized ones (the MLP's gate, up, activation and product), plus the LM head's fp32
    logits, their softmax and gradient (every token counted as a target: an upper bound). For
    SmolLM2 this gives ~1.6 MB/token in bf16; measured on CPU, checkpointing 8 x 280 tokens saved
    ~3 GB (bench/trainer/results.md)."""
    per_layer = 18 * config.hidden_size + 4 * config.intermediate_size
    return config.num_hidden_layers * per_layer * elem_bytes + 3 * 4 * config.vocab_size


def gpu_checkpoint_above(config, elem_bytes: int, free_bytes: int, total_bytes: int, trainable_params: int) -> int:
    """The most padded tokens a micro-batch may have on this GPU without checkpointing: what is
    free once the weights are loaded, less the LoRA training state still to come and a tenth of
    the card as headroom (allocator fragmentation, the optimizer step), over the bytes per token."""
    budget = free_bytes - trainable_params * LORA_STATE_BYTES - total_bytes // 10
    return max(0, budget // activation_bytes_per_token(config, elem_bytes))


class Checkpointing:
    """Recompute each decoder layer in backward only for micro-batches big enough to need it.
    On CPU recomputing costs ~20 % of the training speed (bench/trainer: 396 vs 326 tokens/s)
    and saves ~2-3 GB at 8 x 280 tokens (6.6 vs 3.6 GB peak RSS): small micro-batches (the
    demo's ~100-token questions) run at full speed, big ones stay within memory. On a CUDA GPU
    the token limit comes from its free memory (gpu_checkpoint_above) instead of the setting."""

    def __init__(self, model, mode: bool | None, above_tokens: int) -> None:
        self.mode, self.above = mode, above_tokens
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.layers = []
        if mode is not False:
            # non-reentrant: gradients reach the LoRA weights inside a layer without inputs that require grad
            kwargs = {"use_reentrant": False}
            if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            self.layers = [m for m in base.modules() if hasattr(m, "_gradient_checkpointing_func")]
        device = next(base.parameters()).device
        if mode is None and device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.above = gpu_checkpoint_above(base.config, base.dtype.itemsize, free, total, trainable)
            log.info("checkpointing micro-batches above", tokens=self.above, free_gb=round(free / 2**30, 1))
        self.checkpointed = 0  # micro-batches recomputed so far

    def for_batch(self, padded_tokens: int) -> None:
        """Switch recomputation on or off for the next forward (the layers read the flag)."""
        on = self.mode is True or (self.mode is None and padded_tokens > self.above)
        for layer in self.layers:
            layer.gradient_checkpointing = on
        self.checkpointed += on


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def load_base_model(reference: str | Path, device: torch.device, quantize: str | None = None):
    """The base model for training (flywheel.basemodel's dtype policy: float32 weights on CPU,
    bf16 on a GPU, or NF4 with quantize="4bit"), without the generation cache."""
    model = load_causal_lm(reference, device, quantize)
    model.config.use_cache = False
    return model


def add_lora(model, settings):
    """LoRA on linear layers only, no modules_to_save: loads as is in PEFT and in vLLM. A 4-bit
    base is first prepared for k-bit training (norms and embeddings in fp32, all of it frozen);
    checkpointing stays Checkpointing's decision."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=settings.target_module_list(), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def causal_lm_parts(model):
    """(decoder stack, lm_head) of a causal LM, through a PEFT wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


@contextmanager
def frozen_weights_in_bf16(model, enabled: bool):
    """Under bf16 autocast, hold the frozen base weights of the LoRA-wrapped linear layers in bf16
    while training: autocast would otherwise copy each one to bf16 on every forward (and every
    recomputation), ~20 % of a CPU step. Only where exact (weights stored as bf16, as our model
    files are), so the fp32 model evaluated and served afterwards is bit for bit the one loaded."""
    if not enabled:
        yield
        return
    from peft.tuners.lora import LoraLayer

    lowered = []
    for module in model.modules():
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        if isinstance(module, LoraLayer) and weight is not None and weight.dtype == torch.float32 \
                and not weight.requires_grad:
            low = weight.data.to(torch.bfloat16)
            if torch.equal(low.to(torch.float32), weight.data):
                weight.data = low
                lowered.append(weight)
    try:
        yield
    finally:
        for weight in lowered:
            weight.data = weight.data.to(torch.float32)


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states. A right-padded batch (trainer.batching.collate) needs no
    attention mask: under the causal mask no real token sees the padding after it, and padded
    positions are never targets. Without a mask, SDPA takes its causal kernel, which never builds
    the [batch, heads, len, len] mask and attention matrix (~20 % faster on CPU, same loss)."""
    decoder, _ = causal_lm_parts(model)
    mask = batch["attention_mask"]
    if bool((mask[:, 1:] <= mask[:, :-1]).all()) and bool(mask[:, 0].all()):
        mask = None
    return decoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state


def answer_loss(model, batch: dict[str, torch.Tensor], *, reduction: str = "sum") -> tuple[torch.Tensor, int]:
    """Cross-entropy over target tokens only; returns (loss, number of target tokens). Logits
    are soft-capped where the model's own forward caps them (Gemma 2: tanh(x / c) * c)."""
    _, head = causal_lm_parts(model)
    hidden = hidden_states(model, batch)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    picked = hidden[:, :-1][keep]
    logits = head(picked).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = F.cross_entropy(logits, targets[keep], reduction=reduction)
    return loss, int(keep.sum())
