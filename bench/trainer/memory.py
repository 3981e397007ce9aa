"""What our LoRA loop needs in GPU memory, per parameter and per token, and the table it implies
for 1B / 7B / 8B / 70B models in bf16 and 4-bit (NF4) on 24, 48 and 80 GB cards.

Measured, not guessed: each model's real architecture (its public config.json numbers, below) is
built scaled down (fewer heads, same head size and width ratios, 1 and 2 layers, random weights,
bf16 as the trainer loads it on a GPU) and run through the trainer's own forward and loss
(trainer.modeling: LoRA on all linear layers, bf16 autocast, the LM head on answer tokens only).
A `saved_tensors_hooks` pair adds up every tensor autograd keeps for the backward pass (weights
excluded), with and without activation checkpointing: that is the activation memory, exactly,
independent of the device. The 2-layer minus 1-layer difference is the cost of one decoder layer;
two widths and two lengths check that it grows linearly (the fit error is printed), so it scales
to the full width. Parameters are counted on the meta device from the same configs; LoRA's
trainable parameters cost 16 bytes each (fp32 weight, gradient, two Adam moments).

    .venv/bin/python bench/trainer/memory.py [--quick]

Ends with `RESULT {json}`; writes bench/trainer/memory.json. Assumed, not measured here (no GPU):
CUDA context + allocator slack of FLYWHEEL's loop, taken as 2 GB per card."""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trainer.modeling import add_lora, answer_loss, autocast  # noqa: E402
from trainer.settings import TrainerSettings  # noqa: E402

GIB = 1024 ** 3
CARDS_GB = (24, 48, 80)
OVERHEAD_GB = 2.0  # CUDA context, cuBLAS workspace, allocator fragmentation: assumed
NF4_BYTES = 0.5 + 0.5 / 64 * 2 / 4 + 4 / 256 / 64  # 4-bit weights + double-quantized absmax per 64
# The numbers that size memory, from each model's public config.json on the Hugging Face Hub.
MODELS = {
    "Llama-3.2-1B-Instruct": dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                  tie_word_embeddings=True),
    "Qwen2.5-7B-Instruct": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, intermediate_size=18944,
                                num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064,
                                tie_word_embeddings=False),
    "Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                  tie_word_embeddings=False),
    "Llama-3.1-70B-Instruct": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, intermediate_size=28672,
                                   num_attention_heads=64, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   tie_word_embeddings=False),
}


def make_config(spec: dict, *, kv_heads: int | None = None, layers: int | None = None, vocab: int | None = None):
    """The model's config; with kv_heads set, scaled down to that many KV heads (same head size,
    same query-per-KV grouping and MLP ratio), so per-token costs shrink in proportion."""
    from transformers import AutoConfig

    spec = dict(spec)
    if kv_heads is not None:
        factor = spec["num_key_value_heads"] // kv_heads
        spec.update(num_key_value_heads=kv_heads, num_attention_heads=spec["num_attention_heads"] // factor,
                    hidden_size=spec["hidden_size"] // factor, intermediate_size=spec["intermediate_size"] // factor)
    if layers is not None:
        spec["num_hidden_layers"] = layers
    if vocab is not None:
        spec["vocab_size"] = vocab
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, **spec)


def count_parameters(spec: dict, lora_r: int) -> dict:
    """Exact parameter counts from the config on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    config = make_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    lora = sum(lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name != "lm_head")
    return {"total": total, "decoder_linear": linear, "other": total - linear, "lora": lora}


def saved_bytes(config, tokens: int, answer_tokens: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward over one sequence through our loop (weights excluded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.use_cache = False
    model = add_lora(model, TrainerSettings(lora_dropout=0.0))
    if checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.get_base_model().train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(0, config.vocab_size, (1, tokens))
    labels = torch.full_like(ids, -100)
    labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), True):
        loss, _n = answer_loss(model, batch)
    del loss
    return sum(seen.values())


def per_token_costs(spec: dict, quick: bool) -> dict:
    """Per token: bytes one decoder layer keeps (checkpointed and not), and the loss's bytes per
    answer token, measured at 1 and 2 KV heads (and two lengths) and extrapolated linearly."""
    vocab = 4096  # the loss's per-answer-token cost is vocabulary-proportional: measured on a small one
    widths = (1,) if quick else (1, 2)
    lengths = (128,) if quick else (128, 256)
    rows = []
    for kv in widths:
        for tokens in lengths:
            row = {"kv_heads": kv, "tokens": tokens}
            for ckpt in (False, True):
                one = saved_bytes(make_config(spec, kv_heads=kv, layers=1, vocab=vocab), tokens, 32, ckpt)
                two = saved_bytes(make_config(spec, kv_heads=kv, layers=2, vocab=vocab), tokens, 32, ckpt)
                row["layer_ckpt" if ckpt else "layer"] = (two - one) / tokens
                row["fixed_ckpt" if ckpt else "fixed"] = one - (two - one)
            rows.append(row)
    factor = spec["num_key_value_heads"]
    scale = {kv: factor / kv for kv in widths}
    full = [r["layer"] * scale[r["kv_heads"]] for r in rows]
    full_ckpt = [r["layer_ckpt"] * scale[r["kv_heads"]] for r in rows]
    spread = (max(full) - min(full)) / max(full)
    # the loss: fp32 logits of each answer token (forward) and their softmax grad, bf16 hidden
    loss_per_answer_token = spec["vocab_size"] * (4 + 4) + spec["hidden_size"] * 2
    return {"layer_bytes_per_token": max(full), "layer_bytes_per_token_checkpointed": max(full_ckpt),
            "linearity_spread": spread, "loss_bytes_per_answer_token": loss_per_answer_token, "measured": rows}


def table(name: str, spec: dict, params: dict, costs: dict) -> list[dict]:
    """Max tokens per micro-batch on each card, bf16 and NF4, checkpointing on and off."""
    out = []
    layers = spec["num_hidden_layers"]
    for quant, weight_gb in (("bf16", (params["total"]) * 2 / GIB),
                             ("nf4", (params["decoder_linear"] * NF4_BYTES + params["other"] * 2) / GIB)):
        fixed_gb = weight_gb + params["lora"] * 16 / GIB + OVERHEAD_GB
        for card in CARDS_GB:
            free = (card - fixed_gb) * GIB
            row = {"model": name, "weights": quant, "card_gb": card, "fixed_gb": round(fixed_gb, 1)}
            if free <= 0:
                row.update(fits=False, max_tokens=0, max_tokens_checkpointed=0)
            else:
                # answer tokens taken as a quarter of the tokens (our items: thread context + answer)
                loss = costs["loss_bytes_per_answer_token"] / 4
                plain = layers * costs["layer_bytes_per_token"] + loss
                ckpt = layers * costs["layer_bytes_per_token_checkpointed"] + costs["layer_bytes_per_token"] + loss
                row.update(fits=True, max_tokens=int(free / plain), max_tokens_checkpointed=int(free / ckpt))
            out.append(row)
    return out


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        model = platform.processor() or "unknown"
    return f"{model}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one width and one length per model (~1 min)")
    parser.add_argument("--lora-r", type=int, default=TrainerSettings().lora_r)
    args = parser.parse_args()
    started = time.monotonic()
    results, rows = {}, []
    for name, spec in MODELS.items():
        params = count_parameters(spec, args.lora_r)
        costs = per_token_costs(spec, args.quick)
        results[name] = {"params": params, **{k: v for k, v in costs.items() if k != "measured"},
                         "measured": costs["measured"]}
        rows += table(name, spec, params, costs)
        print(f"{name}: {params['total'] / 1e9:.2f} B params, LoRA r{args.lora_r} {params['lora'] / 1e6:.1f} M; "
              f"per token per layer {costs['layer_bytes_per_token'] / 1024:.1f} KiB "
              f"(checkpointed {costs['layer_bytes_per_token_checkpointed'] / 1024:.2f} KiB, "
              f"linearity spread {costs['linearity_spread']:.1%})", flush=True)
    print(f"\n{'model':24} {'weights':6} {'card':>5} {'fixed GB':>9} {'tokens/micro-batch':>19} {'checkpointed':>13}")
    for r in rows:
        tokens = f"{r['max_tokens']:,}" if r["fits"] else "does not fit"
        ckpt = f"{r['max_tokens_checkpointed']:,}" if r["fits"] else "-"
        print(f"{r['model']:24} {r['weights']:6} {r['card_gb']:>4}G {r['fixed_gb']:>9} {tokens:>19} {ckpt:>13}")
    summary = {"bench": "trainer_memory", "machine": machine(), "quick": args.quick, "lora_r": args.lora_r,
               "overhead_gb_assumed": OVERHEAD_GB, "seconds": round(time.monotonic() - started, 1),
               "models": results, "table": rows}
    (Path(__file__).parent / "memory.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("RESULT " + json.dumps({k: summary[k] for k in ("bench", "machine", "quick", "seconds")}
                                 | {"table": [[r["model"], r["weights"], r["card_gb"], r["max_tokens_checkpointed"]]
                                              for r in rows]}))


if __name__ == "__main__":
    main()
