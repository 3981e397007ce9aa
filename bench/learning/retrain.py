"""Retrain on a finished demo's store and score the adapter the way users meet it, without
Slack: one variant of the training recipe per call, on exactly the data a demo week collected
(its corrections, model paraphrases and feedback), so variants differ only by the recipe.

    .venv/bin/python bench/learning/retrain.py DEMO_OUTPUT NAME [--no-notes] [--unrelated-notes]
        [--neftune ALPHA] [--median-stop] [--extra-paraphrases N --extra-attempts K]
    # trainer settings through the environment as usual, e.g. FLYWHEEL_LORA_DROPOUT=0

DEMO_OUTPUT is a `flywheel demo run` output folder (flywheel.db + results.json); its store is
copied to bench/learning/out/retrain-NAME, never changed. Scores (token F1 against the truth,
per kind of question in results.json): `lora` = the adapter alone, no memory, production's
prompt (the demo's lora_only phase); `after` = the adapter with the memory planned as the bot
plans it (flywheel.memory.plan over the taught answers: straight from the memory, or the model
with notes), offline. The last line is `RESULT {json}`.

The options are the recipe changes tried for the adapter-alone target (bench/learning/results.md):
--no-notes trains without the rows that carry retrieved notes; --unrelated-notes also gives half
the taught paraphrases only notes of other facts; --neftune adds NEFTune noise (uniform, α/√(L·d))
to the input embeddings while training; --median-stop stops on the median of the last losses
instead of their mean; --extra-paraphrases samples N more model paraphrases per taught answer
from the base model (K samples each, the augmenter's prompt and filters)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def setup_env(out: Path) -> None:
    os.environ.update({
        "FLYWHEEL_DATABASE_URL": f"sqlite:///{out / 'flywheel.db'}",
        "FLYWHEEL_BASE_MODEL": os.environ.get("FLYWHEEL_BASE_MODEL", str(ROOT / "models/smollm2-135m-instruct")),
        "FLYWHEEL_ADAPTERS_DIR": str(out / "adapters"), "FLYWHEEL_RUNS_DIR": str(out / "runs"),
        "FLYWHEEL_DATA_DIR": str(out / "data"), "FLYWHEEL_BOT_USER_ID": "UBOT0001",  # as the demo
        "FLYWHEEL_EMBED_MODEL": os.environ.get("FLYWHEEL_EMBED_MODEL", str(ROOT / "models/all-minilm-l6-v2")),
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    os.environ.pop("FLYWHEEL_GATEWAY_URL", None)  # the store's paraphrases only, none asked anew


def median_plateaued(history, settings, total) -> bool:
    """The stop rule on the median of the window (a few hard batches do not hold it up)."""
    window = settings.stop_window
    if settings.stop_loss <= 0 or len(history) < max(window, total // 2) or settings.max_steps is not None:
        return False
    return statistics.median(h["loss"] for h in history[-window:]) < settings.stop_loss


def unrelated_noted_rows(rows, memory):
    """trainer.notes.noted_rows, plus (every other taught paraphrase) a row whose notes are all
    other facts', so the adapter must answer from its weights."""
    from flywheel.memory import MemoryPlan, search_k
    from flywheel.prompt import question_of
    from trainer.notes import _order, _taught, noted_rows

    out = noted_rows(rows, memory)
    chosen = [r for r in rows if r["label"] is None and _taught(r) and r["augmented"] and r.get("parent") is not None]
    k = search_k(memory.settings)
    for i, (row, vector) in enumerate(zip(chosen, memory.embedder.embed([question_of(r["messages"]) for r in chosen]))):
        others = [f for f in memory.index.search(vector, channel=None, k=k + 1) if f.answer != row["answer"]][:k]
        if others and i % 2 == 0:
            plan = MemoryPlan(notes=_order(question_of(row["messages"]), others))
            out.append({**row, "messages": plan.apply(row["messages"]), "augmented": True, "noted": True})
    return out


def sampled_paraphrases(train_rows, embedder, base_dir: Path, n: int, attempts: int, seed: int = 1) -> list[dict]:
    """Up to n more model paraphrases per taught answer, sampled from the base model in process
    with the augmenter's prompt, line filter and drift filter (trainer.augment)."""
    import torch

    from trainer.augment import candidate_lines, keep_own, paraphrase_messages
    from trainer.dataset import TAUGHT_SOURCES, _with_question
    from flywheel.prompt import chat_format, render
    from trainer.modeling import load_base_model, load_tokenizer

    taught = [r for r in train_rows if not r["augmented"] and r["label"] is None and r["source"] in TAUGHT_SOURCES]
    have = {r["messages"][-1]["content"].lower() for r in train_rows}
    tok, model = load_tokenizer(base_dir), load_base_model(base_dir, torch.device("cpu")).eval()
    torch.manual_seed(seed)
    candidates = []
    for row in taught:
        question = row["messages"][-1]["content"]
        ids = tok(render(tok, paraphrase_messages(question, row["answer"], n + 1)), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        gen = model.generate(input_ids=ids, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=24 * (n + 1),
                             num_return_sequences=attempts, pad_token_id=tok.pad_token_id,
                             eos_token_id=list(chat_format(tok).stop_ids))
        lines: list[str] = []
        for seq in gen:
            for line in candidate_lines(question, tok.decode(seq[ids.shape[1]:], skip_special_tokens=True)):
                if line.lower() not in have and line.lower() not in {x.lower() for x in lines}:
                    lines.append(line)
        candidates.append(lines)
    kept = keep_own([r["messages"][-1]["content"] for r in taught], candidates, embedder, 0.6)
    return [_with_question(r, alt, augmented=True, parent=r["example_id"]) for r, alts in zip(taught, kept)
            for alt in alts[:n]]


@dataclass
class Retrained:
    """The adapter trained on the copied store, what scoring it needs, and the figures of its training."""
    model: Any
    tok: Any
    device: Any
    memory: Any
    train_rows: list[dict]
    extra: list[dict]
    noted: list[dict]
    result: Any
    started: float  # time.monotonic() at the start of training (the imports left out) and at its end
    trained: float


def main() -> None:
    args = parse_args()
    src, out = copy_store(args)
    run = retrain(args)
    rows = json.loads((src / "results.json").read_text())["rows"]
    alone, after = answer(run, rows)
    summary = summarize(args, run, rows, alone, after)
    (out / "answers.json").write_text(json.dumps({"summary": summary, "lora": alone, "after": after}, indent=1))
    print("RESULT " + json.dumps(summary), flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo_output", type=Path)
    ap.add_argument("name")
    ap.add_argument("--no-notes", action="store_true")
    ap.add_argument("--unrelated-notes", action="store_true")
    ap.add_argument("--neftune", type=float, default=0.0)
    ap.add_argument("--median-stop", action="store_true")
    ap.add_argument("--extra-paraphrases", type=int, default=0)
    ap.add_argument("--extra-attempts", type=int, default=1)
    return ap.parse_args()


def copy_store(args) -> tuple[Path, Path]:
    """The demo's folder, and out/retrain-NAME holding a fresh copy of its store, which the
    environment now points the settings at."""
    src = args.demo_output.resolve()
    out = ROOT / "bench" / "learning" / "out" / f"retrain-{args.name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(src / "flywheel.db", out / "flywheel.db")
    setup_env(out)
    return src, out


def retrain(args) -> Retrained:
    """Build the snapshot as the trainer does, add the recipe's rows and train a LoRA adapter on it."""
    import trainer.train as training
    from store.db import session_scope
    from trainer.dataset import build_snapshot
    from trainer.encode import encode_rows
    from trainer.evaluate import eval_memory
    from trainer.modeling import add_lora, load_base_model, load_tokenizer, pick_device, use_bf16
    from trainer.notes import noted_rows
    from trainer.settings import TrainerSettings

    settings = TrainerSettings()
    if args.median_stop:
        training.plateaued = median_plateaued
    started = time.monotonic()
    with session_scope() as s:
        snap = build_snapshot(s, settings, augmenter=None)
    device = pick_device("cpu")
    base_dir = Path(settings.base_model)
    tok = load_tokenizer(base_dir)
    model = add_lora(load_base_model(base_dir, device), settings)
    train_rows = list(snap.dataset["train"])
    memory = eval_memory(train_rows, settings)
    extra = (sampled_paraphrases(train_rows, memory.embedder, base_dir, args.extra_paraphrases, args.extra_attempts)
             if args.extra_paraphrases else [])
    train_rows += extra
    noted = [] if args.no_notes else (unrelated_noted_rows if args.unrelated_notes else noted_rows)(train_rows, memory)
    encoded, _too_long = encode_rows(tok, train_rows + noted, settings.max_length)
    hook = neftune_hook(model, args.neftune) if args.neftune > 0 else None
    result = training.train_lora(model, encoded, settings, device=device, bf16=use_bf16(device, settings.bf16),
                                 pad_id=tok.pad_token_id, progress=False,
                                 n_facts=sum(1 for r in train_rows if not r["augmented"]))
    if hook is not None:
        hook.remove()
    return Retrained(model, tok, device, memory, train_rows, extra, noted, result, started, time.monotonic())


def neftune_hook(model, alpha: float):
    """NEFTune: uniform noise, alpha/sqrt(L*d), added to the input embeddings while training; the hook's handle."""
    import torch

    def neftune(_module, _inputs, output):
        if not torch.is_grad_enabled():
            return output
        scale = alpha / (output.shape[-2] * output.shape[-1]) ** 0.5
        return output + torch.empty_like(output).uniform_(-1, 1) * scale
    return model.get_input_embeddings().register_forward_hook(neftune)


def answer(run: Retrained, rows: list[dict]) -> tuple[list[str], list[str | None]]:
    """The demo's questions answered by the adapter alone with production's prompt, and by the
    adapter with the memory planned as the bot plans it (straight from the memory, or with notes)."""
    from flywheel.memory import plan, search_k
    from flywheel.prompt import PromptSettings, build_messages
    from trainer.generate import generate_answers

    model, tok, device, memory = run.model, run.tok, run.device, run.memory
    prompts = [build_messages([{"role": "user", "content": r["question"]}], PromptSettings()) for r in rows]
    model.eval()
    alone = generate_answers(model, tok, prompts, device=device, max_new_tokens=40)  # the demo's answer length
    after: list[str | None] = [None] * len(rows)
    todo = []
    for i, vector in enumerate(memory.embedder.embed([r["question"] for r in rows])):
        p = plan(memory.index.search(vector, channel=None, k=search_k(memory.settings)), memory.settings)
        if p.direct:
            after[i] = p.direct.answer
        else:
            todo.append((i, p.apply(prompts[i])))
    for (i, _), text in zip(todo, generate_answers(model, tok, [m for _, m in todo], device=device, max_new_tokens=40)):
        after[i] = text
    return alone, after


def summarize(args, run: Retrained, rows: list[dict], alone: list[str], after: list[str | None]) -> dict:
    """The RESULT: the training's figures and, per kind of question, token F1 of both answers."""
    from trainer.metrics import token_f1

    result = run.result
    summary = {"name": args.name, "train_rows": len(run.train_rows), "noted_rows": len(run.noted),
               "extra_rows": len(run.extra), "planned_steps": result.steps,
               "stopped_early_at": result.stopped_early_at, "final_loss": round(result.final_loss, 5),
               "train_s": round(run.trained - run.started), "eval_s": round(time.monotonic() - run.trained)}
    for kind in ("asked", "paraphrase", "general"):
        idx = [i for i, r in enumerate(rows) if ("general" if r.get("general") else r["kind"]) == kind]
        if idx:
            summary[kind] = {"lora": round(sum(token_f1(alone[i], rows[i]["truth"]) for i in idx) / len(idx), 3),
                             "after": round(sum(token_f1(after[i], rows[i]["truth"]) for i in idx) / len(idx), 3)}
    return summary


if __name__ == "__main__":
    main()
