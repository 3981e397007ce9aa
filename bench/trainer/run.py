"""Benchmark: our LoRA SFT loop vs a plain transformers Trainer + PEFT baseline, on the same
model, data and hyperparameters, in one run. Each side runs in its own process so peak memory
is measured separately. Tokens/s counts real (non-padding) tokens trained on per second.

    .venv/bin/python bench/trainer/run.py [--model DIR] [--steps 10] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "faq.jsonl"


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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _common(args):
    import torch

    from trainer.encode import encode_rows
    from trainer.modeling import add_lora, load_base_model, load_tokenizer, pick_device
    from trainer.settings import TrainerSettings

    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    settings = TrainerSettings(base_model=args.model, max_steps=args.steps, batch_size=args.batch_size,
                               batch_tokens=10**6, learning_rate=args.lr, lora_r=args.r, lora_alpha=2 * args.r,
                               lora_dropout=0.05, warmup_ratio=0.1, lr_schedule="linear", max_length=1024,
                               checkpoint_every=10**6)
    device = pick_device("auto")
    tok = load_tokenizer(args.model)
    encoded, _ = encode_rows(tok, make_rows(args.items), settings.max_length)
    model = add_lora(load_base_model(args.model, device), settings)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return settings, device, tok, encoded, model


def _memory(device, rss_before_train: float) -> dict:
    import torch

    out = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_after_load_mb": round(rss_before_train, 1)}
    if device.type == "cuda":
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def worker_ours(args) -> dict:
    from trainer.modeling import use_bf16
    from trainer.train import train_lora

    settings, device, tok, encoded, model = _common(args)
    rss = current_rss_mb()
    result = train_lora(model, encoded, settings, device=device, bf16=use_bf16(device, None),
                        pad_id=tok.pad_token_id, progress=False)
    return {"tokens": result.tokens, "seconds": result.seconds, "steps": result.steps,
            "padding_waste": result.padding_waste, "final_loss": result.final_loss, **_memory(device, rss)}


def worker_baseline(args) -> dict:
    """What a tutorial does: Trainer + PEFT, dynamic padding to the longest in each random batch,
    loss through the model's own head over all positions (labels -100 outside the answer)."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    settings, device, tok, encoded, model = _common(args)
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
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=settings.batch_size,
                                  max_steps=settings.max_steps, learning_rate=settings.learning_rate,
                                  lr_scheduler_type="linear", warmup_steps=round(0.1 * settings.max_steps),
                                  weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                                  report_to=[], seed=0, remove_unused_columns=False, bf16=bf16,
                                  dataloader_num_workers=0, disable_tqdm=True, use_cpu=device.type != "cuda")
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate, callbacks=[clock])
        rss = current_rss_mb()
        out_state = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": counted["tokens"], "seconds": clock.seconds, "steps": out_state.global_step,
            "padding_waste": 1 - counted["tokens"] / counted["padded"], "final_loss": losses[-1] if losses else None,
            **_memory(device, rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("FLYWHEEL_BASE_MODEL", "models/smollm2-135m-instruct"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--items", type=int, default=160)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "trainer" / "results.json"))
    parser.add_argument("--worker", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = (worker_ours if args.worker == "ours" else worker_baseline)(args)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for side in ("baseline", "ours"):
        cmd = [sys.executable, __file__, "--worker", side, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[len("RESULT "):])
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        results[side] = r
        print(f"{side:>8}: {r['tokens_per_s']:8.1f} tokens/s  {r['seconds']:6.1f} s  {r['tokens']} tokens  "
              f"padding {100 * r['padding_waste']:4.1f}%  peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f"  peak GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else "")
              + f"  final loss {r['final_loss']:.3f}", flush=True)
    speedup = results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    mem_key = "peak_gpu_mb" if "peak_gpu_mb" in results["ours"] else "peak_rss_mb"
    summary = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size, "items": args.items,
               "lora_r": args.r, "lr": args.lr, "speedup": round(speedup, 2), "memory_metric": mem_key,
               "memory_ratio": round(results["ours"][mem_key] / results["baseline"][mem_key], 3), **results}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"speed-up {speedup:.2f}x (target >= 1.5x); {mem_key} ours/baseline {summary['memory_ratio']:.2f}")


if __name__ == "__main__":
    main()
