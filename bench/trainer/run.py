"""Trainer benchmark: our LoRA SFT loop against a fair baseline, transformers `Trainer` + PEFT
with length-grouped batches (`train_sampling_strategy="group_by_length"`) and the same loss mask
(answer tokens only), both training one full epoch over the same items, so both see the same
tokens. Sides alternate in one invocation, each in its own process (peak RSS is per side), with
a fixed thread count. Utilization: a matmul probe measures this machine's fp32 and bf16 peak, and
each side's useful training FLOP/s is reported as a fraction of the better of the two.

    .venv/bin/python bench/trainer/run.py [--quick] [--items 96] [--rounds 2] [--threads 2] [--profile]

Ends with one line `RESULT {json}` (speedup, tokens/s, peak fraction, peak RSS); also writes
bench/trainer/results.json. Prints numbers; not a test."""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "faq.jsonl"
SIDES = {"baseline": "Trainer + PEFT, group_by_length, fp32 (bf16 on a GPU)",
         "ours": "flywheel train_lora, defaults for this machine",
         "ours_fp32": "flywheel train_lora, bf16 off (the loss-curve reference)"}


def make_rows(n_items: int, seed: int = 0) -> list[dict]:
    """Slack-like items: an FAQ question with 0-6 earlier turns of thread context, so lengths
    vary the way threads do (from ~60 to several hundred tokens)."""
    import random

    rng = random.Random(seed)
    faq = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows = []
    for i in range(n_items):
        target = faq[i % len(faq)]
        context = []
        for other in rng.sample(faq, rng.choice([0, 0, 1, 2, 3, 6])):
            context += [{"role": "user", "content": other["question"]}, {"role": "assistant", "content": other["answer"]}]
        rows.append({"messages": [*context, {"role": "user", "content": target["question"]}], "answer": target["answer"]})
    return rows


def training_flops(config, encoded, lora_r: int) -> float:
    """Useful FLOPs of one pass over `encoded` (model FLOPs: recomputation is not counted).
    Per token: forward through the frozen linear layers (2·P) and backward to their inputs only
    (2·P; frozen weights need no weight gradient); causal attention (QKᵀ and AV over half the
    n² pairs) 2·d·n² per layer and sequence forward, twice that backward; LoRA forward, input and weight gradients 6·r·(in+out) per
    adapted layer. The LM head runs on answer tokens only: 4·V·d each."""
    d, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = [(d, d), (d, kv), (d, kv), (d, d), (d, inter), (d, inter), (inter, d)]  # q k v o gate up down
    linear = layers * sum(i * o for i, o in shapes)
    lora = layers * sum(6 * lora_r * (i + o) for i, o in shapes)
    total = 0.0
    for e in encoded:
        n = len(e)
        answer = sum(1 for x in e.labels[1:] if x != -100)
        total += n * (4 * linear + lora) + layers * 6 * d * n * n + answer * 4 * config.vocab_size * d
    return total


def matmul_peak(threads: int, seconds: float = 1.5) -> dict:
    """Best sustained GFLOP/s of a square matmul in fp32 and bf16: 2048² on `threads` CPU threads,
    8192² on a GPU (where it would train). bf16 is None on a CPU without native bf16 (no AVX-512
    BF16 / AMX): emulated it ran at 0.1 GFLOP/s on this machine's AMD EPYC, so the probe alone
    took ~20 minutes, and the trainer does not use it there."""
    import torch

    from trainer.modeling import cpu_has_bf16, pick_device

    torch.set_num_threads(threads)
    device = pick_device("auto")
    n, reps = (8192, 20) if device.type == "cuda" else (2048, 4)
    out = {"fp32": None, "bf16": None}
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if device.type == "cuda" or cpu_has_bf16() else [])
    for name, dtype in dtypes:
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        a @ b
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, reps * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
        out[name] = round(best, 1)
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _setup(args):
    import torch

    from trainer.encode import encode_rows
    from trainer.modeling import load_tokenizer
    from trainer.settings import TrainerSettings

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    settings = TrainerSettings(base_model=args.model, epochs=1, batch_size=args.batch_size, learning_rate=args.lr,
                               lora_r=args.r, lora_alpha=2 * args.r, warmup_ratio=0.1, lr_schedule="linear",
                               stop_loss=0.0, checkpoint_every=10**6, max_length=1024)
    tok = load_tokenizer(args.model)
    encoded, _ = encode_rows(tok, make_rows(args.items), settings.max_length)
    return settings, tok, encoded


def _profiled(enabled: bool):
    import contextlib

    import torch

    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if enabled \
        else contextlib.nullcontext()


def worker_ours(args, fp32: bool) -> dict:
    from trainer.modeling import add_lora, load_base_model, pick_device, use_bf16, use_checkpointing
    from trainer.train import train_lora

    settings, tok, encoded = _setup(args)
    device = pick_device("auto")
    model = add_lora(load_base_model(args.model, device, settings.quantize), settings)
    bf16 = False if fp32 else use_bf16(device, settings.bf16)
    rss = current_rss_mb()
    with _profiled(args.profile) as prof:
        result = train_lora(model, encoded, settings, device=device, bf16=bf16, pad_id=tok.pad_token_id,
                            progress=False)
    return {"tokens": result.tokens, "seconds": result.seconds, "steps": result.steps, "bf16": bf16,
            "activation_checkpointing": {None: f"auto (> {settings.checkpoint_above_tokens} tokens)", True: "on",
                                         False: "off"}[use_checkpointing(device, settings.activation_checkpointing)],
            "checkpointed_batches": result.checkpointed_batches, "padding_waste": result.padding_waste,
            "losses": [h["loss"] for h in result.history], "final_loss": result.final_loss,
            "flops": training_flops(model.config, encoded, args.r), **_memory(rss), **_table(prof)}


def worker_baseline(args) -> dict:
    """What a careful tutorial does on CPU: Trainer + PEFT (fp32, no checkpointing), batches
    grouped by length, dynamic padding, the model's own loss with labels -100 outside the answer."""
    import tempfile

    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from trainer.modeling import load_base_model, pick_device

    settings, tok, encoded = _setup(args)
    device = pick_device("auto")
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=settings.target_module_list(), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load_base_model(args.model, device), config)
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
                            "attention_mask": [[1] * len(e) for e in encoded]})
    inner = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    counted = {"tokens": 0, "padded": 0}

    def collate(features):
        batch = inner(features)
        counted["tokens"] += int(batch["attention_mask"].sum())
        counted["padded"] += batch["attention_mask"].numel()
        return batch

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=settings.batch_size,
                                  num_train_epochs=1, learning_rate=settings.learning_rate,
                                  train_sampling_strategy="group_by_length", lr_scheduler_type="linear",
                                  warmup_steps=settings.warmup_ratio,  # a float < 1: a ratio of the steps
                                  weight_decay=0.0, max_grad_norm=1.0,
                                  logging_steps=1, save_strategy="no", report_to=[], seed=0,
                                  remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
                                  use_cpu=device.type != "cuda", bf16=device.type == "cuda")
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate, callbacks=[clock])
        rss = current_rss_mb()
        with _profiled(args.profile) as prof:
            state = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": counted["tokens"], "seconds": clock.seconds, "steps": state.global_step, "bf16": targs.bf16,
            "activation_checkpointing": False, "padding_waste": 1 - counted["tokens"] / counted["padded"],
            "losses": losses, "final_loss": losses[-1] if losses else None,
            "flops": training_flops(model.config, encoded, args.r), **_memory(rss), **_table(prof)}


def _memory(rss_before_train: float) -> dict:
    import torch

    out = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_load_mb": round(rss_before_train, 1)}
    if torch.cuda.is_available():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _table(prof) -> dict:
    if prof is None:
        return {}
    return {"profile": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)}


def run_side(side: str, argv: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--worker", side, *argv], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    r["gflops_per_s"] = r["flops"] / r["seconds"] / 1e9
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("FLYWHEEL_BASE_MODEL", "models/smollm2-135m-instruct"))
    parser.add_argument("--quick", action="store_true", help="64 items, one round, no fp32 reference (~3 min)")
    parser.add_argument("--no-reference", action="store_true", help="skip the fp32 loss-curve reference run")
    parser.add_argument("--items", type=int, default=96, help="items in the epoch both sides train")
    parser.add_argument("--rounds", type=int, default=2, help="alternating baseline/ours runs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", action="store_true", help="print each side's top operators (torch.profiler)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "trainer" / "results.json"))
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.items, args.rounds = min(args.items, 64), 1
    if args.worker:
        result = worker_baseline(args) if args.worker == "baseline" else worker_ours(args, args.worker == "ours_fp32")
        print("RESULT " + json.dumps(result))
        return
    argv = ["--model", args.model, "--items", str(args.items), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--r", str(args.r), "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    peak = matmul_peak(args.threads)
    best = max(v for v in peak.values() if v)
    print(f"matmul peak on {args.threads} threads: fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s; "
          f"{args.items} items, one epoch per run, {args.rounds} round(s)", flush=True)
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    order = ["baseline", "ours"] * args.rounds + ([] if args.quick or args.no_reference else ["ours_fp32"])
    for side in order:
        r = run_side(side, argv, args.threads)
        runs[side].append(r)
        print(f"{side:>9}: {r['tokens_per_s']:7.1f} tokens/s  {r['seconds']:6.1f} s  {r['tokens']} tokens  "
              f"{r['gflops_per_s']:5.1f} GFLOP/s ({100 * r['gflops_per_s'] / best:4.1f}% of peak)  "
              f"padding {100 * r['padding_waste']:4.1f}%  peak RSS {r['peak_rss_mb']:.0f} MB  "
              f"final loss {r['final_loss']:.3f}", flush=True)
        if r.get("profile"):
            print(r.pop("profile"))
    med = {side: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "gflops_per_s", "peak_rss_mb")}
           for side, rs in runs.items() if rs}
    ours, base = med["ours"], med["baseline"]
    result = {"speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 2),
              "ours_tokens_per_s": round(ours["tokens_per_s"], 1), "baseline_tokens_per_s": round(base["tokens_per_s"], 1),
              "ours_peak_fraction": round(ours["gflops_per_s"] / best, 3),
              "baseline_peak_fraction": round(base["gflops_per_s"] / best, 3),
              "ours_peak_rss_mb": round(ours["peak_rss_mb"]), "baseline_peak_rss_mb": round(base["peak_rss_mb"]),
              "matmul_peak_gflops": peak, "items": args.items, "rounds": args.rounds, "threads": args.threads,
              "ours_bf16": runs["ours"][0]["bf16"], "ours_activation_checkpointing": runs["ours"][0]["activation_checkpointing"]}
    if "peak_gpu_mb" in runs["ours"][0]:
        result["ours_peak_gpu_mb"] = runs["ours"][0]["peak_gpu_mb"]
    if runs["ours_fp32"]:
        ref, low = runs["ours_fp32"][0]["losses"], runs["ours"][0]["losses"]
        result["ours_fp32_tokens_per_s"] = round(med["ours_fp32"]["tokens_per_s"], 1)
        result["bf16_loss_max_abs_diff"] = round(max(abs(a - b) for a, b in zip(ref, low)), 4)
        result["bf16_final_loss_diff"] = round(low[-1] - ref[-1], 4)
    Path(args.out).write_text(json.dumps({"result": result, "runs": runs}, indent=2))
    print(f"ours / baseline: {result['speedup']:.2f}x tokens/s (target >= 1.5x), {100 * result['ours_peak_fraction']:.1f}% "
          f"of the measured peak (target >= 30%), peak RSS {result['ours_peak_rss_mb']} MB (target <= 3000)")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
