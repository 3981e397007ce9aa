"""Does LoRA on the real SmolLM2 learn 20 fictional company facts? (slow: ~3 minutes on 2 CPU
cores). DESIGN.md measured token F1 1.00 on the training questions and 0.53 on paraphrases
against 0.17 for the base model; we require a clear gain, not the exact numbers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flywheel.modelfiles import default_model_dir, read_marker

DATA = Path(__file__).parent / "data"


@pytest.mark.slow
def test_smollm2_learns_the_faq():
    model_dir = default_model_dir()
    if read_marker(model_dir) is None:
        pytest.skip("SmolLM2 not fetched: run `make model`")
    from trainer.encode import encode_rows
    from trainer.evaluate import BASE, CANDIDATE, variant
    from trainer.generate import generate_answers
    from trainer.metrics import answer_metrics
    from trainer.modeling import add_lora, load_base_model, load_tokenizer
    from trainer.settings import TrainerSettings
    from trainer.train import train_lora

    def rows(name):
        items = [json.loads(line) for line in (DATA / name).read_text().splitlines()]
        return [{"messages": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in items]

    train, para = rows("faq.jsonl"), rows("faq_paraphrases.jsonl")
    cfg = TrainerSettings(max_steps=60, batch_size=8, learning_rate=1e-3, lora_r=16, lora_alpha=32, warmup_ratio=0.1)
    cpu = torch.device("cpu")
    tok = load_tokenizer(model_dir)
    model = add_lora(load_base_model(model_dir, cpu), cfg)
    encoded, _ = encode_rows(tok, train, cfg.max_length)
    result = train_lora(model, encoded, cfg, device=cpu, bf16=False, pad_id=tok.pad_token_id, progress=False)
    scores = {}
    # the base model only on the paraphrases: its score on the training questions is asserted nowhere
    for name, split, items in ((CANDIDATE, "train", train), (CANDIDATE, "paraphrase", para), (BASE, "paraphrase", para)):
        with variant(model, name):
            preds = generate_answers(model, tok, [r["messages"] for r in items], device=cpu, max_new_tokens=40)
            scores[(name, split)] = answer_metrics(preds, [r["answer"] for r in items])["token_f1"]
    print({f"{a}/{b}": round(v, 3) for (a, b), v in scores.items()}, "final loss", result.final_loss)
    assert result.final_loss < 0.1
    assert scores[(CANDIDATE, "train")] > 0.9
    assert scores[(CANDIDATE, "paraphrase")] > scores[(BASE, "paraphrase")] + 0.15
