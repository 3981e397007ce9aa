"""Serving in bf16 on CPU, checked against fp32 on the demo questions: the base model answers
every demo question (the taught ones, their paraphrases, the general ones) greedily through the
one prompt (flywheel.prompt) in fp32, with bf16 autocast over the fp32 weights, and with the
weights themselves in bf16; reported per variant: generation tokens/s one question at a time (as
the gateway serves) and 16 at a time (as the evaluator does), the share of answers identical to
fp32's, their token F1 against fp32's answers and against the true answers.

    .venv/bin/python bench/serving/bf16.py [--quick] [--model DIR] [--threads 2]

Ends with one line `RESULT {json}`. Prints numbers; not a test."""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def questions(limit: int | None) -> list[tuple[str, str]]:
    """(question, true answer): the demo's rows, taught questions with two paraphrases each and
    the general questions (flywheel.app.demo.script builds them for the demo too)."""
    from flywheel.app.demo.script import load_facts, make_rows

    rows = make_rows(*load_facts(), paraphrases=2)
    return [(row.question, row.truth) for row in rows][:limit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    ap.add_argument("--quick", action="store_true", help="the first 24 questions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from flywheel.prompt import PromptSettings, build_messages
    from trainer.generate import generate_answers
    from trainer.metrics import token_f1
    from trainer.modeling import cpu_has_bf16, load_tokenizer

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    asked = questions(24 if args.quick else None)
    prompt = PromptSettings()
    conversations = [build_messages([{"role": "user", "content": q}], prompt) for q, _ in asked]
    tok = load_tokenizer(args.model)
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, local_files_only=True).eval()
    variants = {"fp32": (fp32, contextlib.nullcontext),
                "bf16 autocast": (fp32, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
                "bf16 weights": (bf16, contextlib.nullcontext)}
    print(f"{len(asked)} questions, {args.threads} threads, CPU bf16 support: {cpu_has_bf16()}", flush=True)
    answers, rows = {}, {}
    for name, (model, context) in variants.items():
        timing = {}
        for batch in (1, 16):
            with context():
                started = time.perf_counter()
                out = generate_answers(model, tok, conversations, device=cpu, max_new_tokens=args.max_new_tokens,
                                       batch_size=batch)
                seconds = time.perf_counter() - started
            tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in out)
            timing[batch] = tokens / seconds
            answers.setdefault(name, out)  # batch 1 is how the gateway serves: its answers are compared
        ref = answers["fp32"]
        rows[name] = {"tokens_per_s_batch1": round(timing[1], 1), "tokens_per_s_batch16": round(timing[16], 1),
                      "identical_to_fp32": round(sum(a == b for a, b in zip(answers[name], ref)) / len(ref), 3),
                      "f1_vs_fp32": round(statistics.fmean(token_f1(a, b) for a, b in zip(answers[name], ref)), 3),
                      "f1_vs_truth": round(statistics.fmean(token_f1(a, t) for a, (_, t) in zip(answers[name], asked)), 3)}
        r = rows[name]
        print(f"{name:>14}: {r['tokens_per_s_batch1']:6.1f} tokens/s one at a time, {r['tokens_per_s_batch16']:6.1f} "
              f"16 at a time; identical to fp32 {100 * r['identical_to_fp32']:.0f} %, F1 vs fp32 {r['f1_vs_fp32']:.3f}, "
              f"vs truth {r['f1_vs_truth']:.3f}", flush=True)
    base = rows["fp32"]
    result = {"questions": len(asked), "threads": args.threads, "variants": rows,
              "speedup_batch1": {k: round(v["tokens_per_s_batch1"] / base["tokens_per_s_batch1"], 2) for k, v in rows.items()},
              "speedup_batch16": {k: round(v["tokens_per_s_batch16"] / base["tokens_per_s_batch16"], 2) for k, v in rows.items()}}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
