"""LoRA SFT on the tiny model: answer-only labels, length grouping, schedules, the loop,
checkpoint + resume, and the saved adapter loading back in PEFT."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flywheel.adapters import adapter_digest, verify_adapter
from trainer.batching import padding_waste, plan_batches
from trainer.encode import IGNORE, encode_example
from trainer.modeling import add_lora, answer_loss, load_base_model, load_tokenizer
from trainer.optim import lr_factor
from trainer.settings import TrainerSettings
from trainer.train import clear_checkpoint, plan_steps, save_adapter, train_lora

DATA = Path(__file__).parent / "data"
CPU = torch.device("cpu")


def faq_rows():
    rows = [json.loads(line) for line in (DATA / "faq.jsonl").read_text().splitlines()]
    return [{"messages": [{"role": "user", "content": r["question"]}], "answer": r["answer"]} for r in rows]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def test_labels_cover_only_the_answer_and_end_of_turn(tok):
    enc = encode_example(tok, [{"role": "user", "content": "Who?"}], "Marta.")
    n_target = enc.target_tokens
    answer_ids = tok("Marta.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert enc.labels[-n_target:] == answer_ids and all(x == IGNORE for x in enc.labels[:-n_target])
    assert tok.decode(enc.input_ids[:-n_target]).endswith("<|im_start|>assistant\n")


def test_length_grouping_removes_padding_waste():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 300) for _ in range(512)]
    grouped = plan_batches(lengths, batch_size=8, batch_tokens=10**6, seed=0, epoch=0)
    naive = [list(range(i, min(i + 8, 512))) for i in range(0, 512, 8)]
    assert sorted(i for b in grouped for i in b) == list(range(512))
    assert padding_waste(grouped, lengths) < 0.05 < 0.3 < padding_waste(naive, lengths)
    assert grouped == plan_batches(lengths, batch_size=8, batch_tokens=10**6, seed=0, epoch=0)
    assert grouped != plan_batches(lengths, batch_size=8, batch_tokens=10**6, seed=0, epoch=1)
    capped = plan_batches(lengths, batch_size=8, batch_tokens=600, seed=0, epoch=0)
    assert all(max(lengths[i] for i in b) * len(b) <= 600 or len(b) == 1 for b in capped)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    f = [lr_factor(s, 100, 10, schedule, 0.95) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == 1.0
    else:
        assert f[-1] < 0.1 and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_answer_loss_matches_full_logits_loss(tiny_model_dir, tok):
    model = load_base_model(tiny_model_dir, CPU)
    from trainer.batching import collate

    encs = [encode_example(tok, r["messages"], r["answer"]) for r in faq_rows()[:3]]
    batch = collate(encs, tok.pad_token_id)
    ours, n = answer_loss(model, batch, reduction="mean")
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert n == sum(e.target_tokens for e in encs) and float(ours.detach()) == pytest.approx(float(ref), rel=1e-4)


def _train(tiny_model_dir, tok, tmp_path, **kw):
    cfg = TrainerSettings(batch_size=4, learning_rate=3e-2, lora_r=8, lora_alpha=16, warmup_ratio=0.1,
                          max_steps=kw.pop("max_steps", 12), checkpoint_every=4, **kw)
    model = add_lora(load_base_model(tiny_model_dir, CPU), cfg)
    encs = [encode_example(tok, r["messages"], r["answer"]) for r in faq_rows()]
    return model, cfg, encs


def test_training_lowers_loss_and_saves_a_peft_adapter(tiny_model_dir, tok, tmp_path):
    model, cfg, encs = _train(tiny_model_dir, tok, tmp_path, optimizer="adamw", lr_schedule="cosine")
    points = []
    result = train_lora(model, encs, cfg, device=CPU, bf16=False, pad_id=tok.pad_token_id,
                        on_step=lambda s, t, p: points.append((s, t)), progress=False)
    assert result.steps == 12 and points[-1] == (12, 12) and len(points) == 12
    first, last = result.history[0]["loss"], sum(h["loss"] for h in result.history[-3:]) / 3
    assert last < first - 0.15  # a random tiny model has little headroom below ln(vocab)
    digest = save_adapter(model, tmp_path / "ad")
    assert digest == adapter_digest(tmp_path / "ad") == verify_adapter(tmp_path / "ad", expected_sha256=digest)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert not config.get("modules_to_save") and config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    from peft import PeftModel
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ad" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in keys)
    reloaded = PeftModel.from_pretrained(load_base_model(tiny_model_dir, CPU), str(tmp_path / "ad"))
    batch = {"input_ids": torch.tensor([encs[0].input_ids])}
    with torch.no_grad():
        a = model(**batch).logits
        b = reloaded(**batch).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_sgd_and_accumulation_run(tiny_model_dir, tok, tmp_path):
    model, cfg, encs = _train(tiny_model_dir, tok, tmp_path, optimizer="sgd", grad_accum=2, max_steps=3,
                              lr_schedule="exponential")
    result = train_lora(model, encs, cfg, device=CPU, bf16=False, pad_id=tok.pad_token_id, progress=False)
    assert result.steps == 3 and all(h["loss"] > 0 for h in result.history)
    assert len(plan_steps([len(e) for e in encs], cfg)[0]) == 2


def test_checkpoint_resume_continues_where_it_stopped(tiny_model_dir, tok, tmp_path):
    ckpt = tmp_path / "ckpt"
    model, cfg, encs = _train(tiny_model_dir, tok, tmp_path)

    def stop_at_6(step, total, point):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(model, encs, cfg, device=CPU, bf16=False, pad_id=tok.pad_token_id, checkpoint_dir=ckpt,
                   on_step=stop_at_6, progress=False)
    assert (ckpt / "checkpoint.pt").is_file()
    model2, _, _ = _train(tiny_model_dir, tok, tmp_path)
    seen = []
    result = train_lora(model2, encs, cfg, device=CPU, bf16=False, pad_id=tok.pad_token_id, checkpoint_dir=ckpt,
                        on_step=lambda s, t, p: seen.append(s), progress=False)
    assert result.resumed_from == 4 and seen[0] == 5 and len(result.history) == 12
    clear_checkpoint(ckpt)
    assert not ckpt.exists()


def test_the_schedule_follows_the_data_size():
    """Each taught fact is seen ~exposures_per_fact times: a floor lets 10 facts be learned,
    a cap keeps 1,000 from taking hours, and long schedules get a lower learning rate."""
    from trainer.settings import TrainerSettings
    from trainer.train import auto_steps, effective_lr, plan_steps

    cfg = TrainerSettings(batch_size=8, exposures_per_fact=16, min_steps=30, max_auto_steps=600, learning_rate=1e-3)
    assert [auto_steps(n, cfg) for n in (10, 30, 45, 200, 1000)] == [30, 60, 90, 400, 600]
    assert effective_lr(cfg, 60) == 1e-3 and effective_lr(cfg, 400) == pytest.approx(1e-3 * (0.5 ** 0.5))
    assert effective_lr(cfg, 10_000) == 5e-4
    lengths = [40] * 120  # 30 facts in 4 phrasings each
    assert len(plan_steps(lengths, cfg, n_facts=30)) == 60
    fixed = TrainerSettings(epochs=2, batch_size=8)
    assert len(plan_steps(lengths, fixed, n_facts=30)) == 30 and effective_lr(fixed, 30) == fixed.learning_rate


def test_training_stops_once_the_loss_has_plateaued():
    from trainer.settings import TrainerSettings
    from trainer.train import plateaued

    cfg = TrainerSettings(stop_loss=0.02, stop_window=4)
    low = [{"loss": 0.01}] * 6
    assert not plateaued(low, cfg, total=20)  # not before half the plan
    assert plateaued(low * 2, cfg, total=20)
    assert not plateaued([{"loss": 0.01}] * 8 + [{"loss": 0.5}] * 4, cfg, total=20)
    assert not plateaued(low * 2, TrainerSettings(stop_loss=0, stop_window=4), total=20)


def _bf16_exact_base(tiny_model_dir):
    """The tiny model rounded to bf16 values, as our real model files are stored."""
    model = load_base_model(tiny_model_dir, CPU)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def test_bf16_training_follows_the_fp32_loss_curve_and_leaves_the_base_exact(tiny_model_dir, tok):
    """bf16 autocast (the CPU default where AVX-512 BF16 / AMX exist) with the frozen weights held
    in bf16: the loss curve stays within 2 % of fp32's at every step, and the model evaluated
    afterwards has bit for bit the fp32 base weights it was loaded with."""
    encs = [encode_example(tok, r["messages"], r["answer"]) for r in faq_rows()]
    cfg = TrainerSettings(batch_size=4, learning_rate=3e-2, lora_r=8, lora_alpha=16, max_steps=15)
    curves = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = add_lora(_bf16_exact_base(tiny_model_dir), cfg)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        result = train_lora(model, encs, cfg, device=CPU, bf16=bf16, pad_id=tok.pad_token_id, progress=False)
        curves[bf16] = [h["loss"] for h in result.history]
        after = dict(model.named_parameters())
        assert all(after[n].dtype == torch.float32 and torch.equal(after[n], p) for n, p in frozen.items())
    assert curves[True][-1] < curves[True][0] - 0.1
    assert max(abs(a - b) / b for a, b in zip(curves[True], curves[False])) < 0.02


def test_activation_checkpointing_gives_the_same_gradients(tiny_model_dir, tok):
    """Recomputing each layer in backward changes memory, never the gradient; the CPU default
    recomputes only micro-batches over checkpoint_above_tokens."""
    from trainer.batching import collate
    from trainer.modeling import Checkpointing

    batch = collate([encode_example(tok, r["messages"], r["answer"]) for r in faq_rows()[:4]], tok.pad_token_id)
    size = batch["input_ids"].numel()
    grads = {}
    for mode, above in ((False, 1), (True, 1), (None, size), (None, size - 1)):
        torch.manual_seed(0)
        model = add_lora(load_base_model(tiny_model_dir, CPU), TrainerSettings(lora_r=8, lora_alpha=16))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # B starts at zero; make A's gradient non-trivial too
        policy = Checkpointing(model, mode, above)
        policy.for_batch(size)
        model.train()
        loss, _ = answer_loss(model, batch)
        loss.backward()
        expected = mode is True or (mode is None and size > above)
        assert policy.checkpointed == expected
        assert all(layer.gradient_checkpointing == expected for layer in policy.layers)
        assert (len(policy.layers) == 0) == (mode is False)
        grads[(mode, above)] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = grads.pop((False, 1))
    for other in grads.values():
        assert other.keys() == reference.keys()
        assert all(torch.allclose(other[n], reference[n], rtol=1e-4, atol=1e-6) for n in reference)
