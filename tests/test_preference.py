"""Preference objectives (trainer/preference.py) against TRL's own DPO and KTO trainers on the same
tiny model, the same token ids and the same adapter weights; and a short sft+dpo run that moves
the model towards the taught answers and away from the rejected ones."""
from __future__ import annotations

import tempfile

import pytest
import torch

from trainer.batching import collate
from trainer.encode import IGNORE
from trainer.modeling import load_base_model, load_tokenizer
from trainer.preference import (Unpaired, dpo_step_loss, encode_pairs, encode_unpaired, kto_step_loss,
                                preference_metrics, repeats_rejected)
from trainer.settings import TrainerSettings

trl = pytest.importorskip("trl")
ROWS = [
    {"messages": [{"role": "user", "content": "Who runs payroll?"}], "answer": "Aino Virtanen runs payroll.",
     "rejected_answer": "The CEO runs payroll."},
    {"messages": [{"role": "user", "content": "When is payday?"}], "answer": "Payday is the 25th.",
     "rejected_answer": "Payday is every Friday afternoon."},
    {"messages": [{"role": "user", "content": "Where is the office?"}], "answer": "The office is in Tallinn.",
     "rejected_answer": "It is in Berlin."},
]
CPU = torch.device("cpu")


@pytest.fixture
def model_and_pairs(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False)
    model = get_peft_model(load_base_model(tiny_model_dir, CPU), config)
    with torch.no_grad():  # a policy well away from the reference, so the losses are not all log 2
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(40)
    return tok, model, encode_pairs(tok, ROWS, 512)


def _completion_batch(items, pad_id):
    b = collate(items, pad_id)
    return b["input_ids"], b["attention_mask"], (b["labels"] != IGNORE).long()


def _base_as_reference(trainer) -> None:
    """TRL copies an existing adapter as its reference ("ref"); ours is the base model (adapter
    off), which is TRL's choice for a new adapter: drop the copy so both compare the same thing."""
    if "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")
    trainer.model.set_adapter("default")


def test_dpo_loss_matches_trl(model_and_pairs):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, model, pairs = model_and_pairs
    ours = dpo_step_loss(model, pairs, tok.pad_token_id, 0.1, CPU)
    trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, report_to=[],
                                                     use_cpu=True, per_device_train_batch_size=len(pairs)),
                         train_dataset=Dataset.from_list([{"prompt": r["messages"],
                                                           "chosen": [{"role": "assistant", "content": r["answer"]}],
                                                           "rejected": [{"role": "assistant", "content": r["rejected_answer"]}]}
                                                          for r in ROWS]), processing_class=tok)
    _base_as_reference(trainer)
    ids, mask, completion = _completion_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], tok.pad_token_id)
    theirs = trainer._compute_loss(trainer.model, {"input_ids": ids, "attention_mask": mask, "completion_mask": completion},
                                   return_outputs=False)
    assert abs(ours.item() - 0.6931) > 1e-3  # not the trivial value: the policy differs from the reference
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)


def test_kto_loss_matches_trl(model_and_pairs):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    tok, model, pairs = model_and_pairs
    items = ([Unpaired(p.chosen, True, p.mismatched) for p in pairs]
             + [Unpaired(p.rejected, False, p.mismatched) for p in pairs])
    ours = kto_step_loss(model, items, tok.pad_token_id, 0.1, CPU)
    rows = [{"prompt": r["messages"], "completion": [{"role": "assistant", "content": a}], "label": good}
            for r in ROWS for a, good in ((r["answer"], True), (r["rejected_answer"], False))]
    trainer = KTOTrainer(model=model, args=KTOConfig(output_dir=tempfile.mkdtemp(), beta=0.1, report_to=[], use_cpu=True,
                                                     per_device_train_batch_size=len(rows)),
                         train_dataset=Dataset.from_list(rows), processing_class=tok)
    _base_as_reference(trainer)
    ids, mask, completion = _completion_batch([p.chosen for p in pairs] + [p.rejected for p in pairs], tok.pad_token_id)
    kl_ids, kl_mask, kl_completion = _completion_batch([p.mismatched for p in pairs] * 2, tok.pad_token_id)
    n = len(pairs)
    theirs = trainer._compute_loss(trainer.model, {
        "input_ids": ids, "attention_mask": mask, "completion_mask": completion,
        "KL_input_ids": kl_ids, "KL_attention_mask": kl_mask, "KL_completion_mask": kl_completion,
        "label": torch.tensor([True] * n + [False] * n)}, return_outputs=False)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)


def test_pairs_need_a_different_rejected_answer(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    rows = ROWS + [{"messages": [{"role": "user", "content": "Same?"}], "answer": "Yes.", "rejected_answer": " Yes. "},
                   {"messages": [{"role": "user", "content": "None?"}], "answer": "Yes.", "rejected_answer": None}]
    assert len(encode_pairs(tok, rows, 512)) == len(ROWS)
    assert repeats_rejected("The CEO runs payroll", "Aino Virtanen runs payroll.", "The CEO runs payroll.")
    assert not repeats_rejected("Aino runs payroll", "Aino Virtanen runs payroll.", "The CEO runs payroll.")


def test_sft_plus_dpo_moves_the_margin_further_than_sft_alone(tiny_model_dir):
    from trainer.encode import encode_rows
    from trainer.modeling import add_lora
    from trainer.train import train_lora

    tok = load_tokenizer(tiny_model_dir)
    pairs = encode_pairs(tok, ROWS, 512)
    encoded, _ = encode_rows(tok, ROWS, 512)
    margins = {}
    for objective in ("sft", "sft+dpo"):
        torch.manual_seed(0)
        settings = TrainerSettings(objective=objective, max_steps=30, learning_rate=5e-3, warmup_ratio=0.0, lora_r=4,
                                   preference_batch_size=3)
        model = add_lora(load_base_model(tiny_model_dir, CPU), settings)
        before = preference_metrics(model, pairs, tok.pad_token_id, CPU)
        result = train_lora(model, encoded, settings, device=CPU, bf16=False, pad_id=tok.pad_token_id,
                            progress=False, pairs=pairs)
        margins[objective] = (before.mean_margin, preference_metrics(model, pairs, tok.pad_token_id, CPU).mean_margin)
        assert all(("dpo" in h) == (objective == "sft+dpo") for h in result.history)
    assert margins["sft"][0] == margins["sft+dpo"][0]  # the same start
    assert margins["sft+dpo"][1] > margins["sft"][1] + 1.0, margins


def test_kto_learns_from_a_downvote_nobody_corrected(tiny_model_dir):
    """An answer voted down with no better one taught is KTO's undesirable item: a short kto run
    lowers its log-probability against the base model, while SFT alone never sees it."""
    from trainer.encode import encode_rows
    from trainer.modeling import add_lora
    from trainer.preference import reference_logps, sequence_logps
    from trainer.train import train_lora

    tok = load_tokenizer(tiny_model_dir)
    liked = [{"messages": r["messages"], "answer": r["answer"], "source": "correction"} for r in ROWS]
    downvoted = [{"messages": [{"role": "user", "content": "Is the office open on Sunday?"}], "answer": None,
                  "rejected_answer": "Yes, the office is open every Sunday night.", "source": "rejected"}]
    items = encode_unpaired(tok, liked + downvoted, 512)
    assert [it.desirable for it in items] == [True] * 3 + [False]
    bad = collate([items[-1].answer], tok.pad_token_id)
    encoded, _ = encode_rows(tok, liked, 512)
    ratio = {}
    for objective in ("sft", "kto"):
        torch.manual_seed(0)
        settings = TrainerSettings(objective=objective, max_steps=30, learning_rate=5e-3, warmup_ratio=0.0, lora_r=4,
                                   preference_batch_size=4, preference_beta=0.5)
        model = add_lora(load_base_model(tiny_model_dir, CPU), settings)
        result = train_lora(model, encoded, settings, device=CPU, bf16=False, pad_id=tok.pad_token_id,
                            progress=False, pairs=items)
        assert all(("kto" in h) == (objective == "kto") for h in result.history)
        model.eval()
        with torch.no_grad():
            ratio[objective] = float(sequence_logps(model, bad) - reference_logps(model, bad))
    assert ratio["kto"] < ratio["sft"] - 1.0, ratio  # pushed away from what people voted down
