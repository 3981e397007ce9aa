"""The LoRA SFT loop: length-grouped micro-batches, gradient accumulation, warmup + decay,
gradient clipping, a progress bar, progress callbacks (the store's heartbeat) and
checkpoints a later run with the same data and settings resumes from."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flywheel.adapters import adapter_digest
from flywheel.logs import get_logger
from trainer.batching import collate, padding_waste, plan_batches
from trainer.encode import IGNORE, Encoded
from trainer.modeling import (
    Checkpointing,
    answer_loss,
    autocast,
    frozen_weights_in_bf16,
    use_checkpointing,
)
from trainer.optim import make_optimizer, make_scheduler

log = get_logger("trainer.train")
CHECKPOINT = "checkpoint.pt"
StepHook = Callable[[int, int, dict], None]


class TrainingError(RuntimeError):
    """Training cannot go on (no data, a non-finite loss, a lost lease)."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # [{"step", "loss", "lr", "tokens_per_s"}]
    tokens: int = 0  # real (non-padding) tokens processed in this process
    target_tokens: int = 0
    seconds: float = 0.0
    padding_waste: float = 0.0
    resumed_from: int = 0
    stopped_early_at: int | None = None
    checkpointed_batches: int = 0  # micro-batches recomputed in backward (modeling.Checkpointing)

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def auto_steps(n_facts: int, settings) -> int:
    """Optimizer steps that show each taught fact about `exposures_per_fact` times."""
    per_step = settings.batch_size * settings.grad_accum
    wanted = math.ceil(settings.exposures_per_fact * max(1, n_facts) / per_step)
    return max(settings.min_steps, min(settings.max_auto_steps, wanted))


def effective_lr(settings, total_steps: int) -> float:
    """The set learning rate, scaled down (to at most half) for long automatic schedules:
    hundreds of steps at the rate that teaches 20 facts in 40 steps overshoot."""
    if settings.epochs is not None or settings.max_steps is not None:
        return settings.learning_rate
    return settings.learning_rate * min(1.0, max(0.5, math.sqrt(200 / max(total_steps, 1))))


def plan_steps(lengths: list[int], settings, n_facts: int | None = None) -> list[list[list[int]]]:
    """Every optimizer step's micro-batches: over the set epochs, up to max_steps, or, with
    neither set, as many steps as the data size asks for (auto_steps)."""
    if not lengths:
        raise TrainingError("no training items left after encoding")
    limit = settings.max_steps
    if settings.epochs is None and limit is None:
        limit = auto_steps(n_facts if n_facts is not None else len(lengths), settings)
    steps: list[list[list[int]]] = []
    epoch = 0
    while True:
        batches = plan_batches(lengths, batch_size=settings.batch_size, batch_tokens=settings.batch_tokens,
                               seed=settings.seed, epoch=epoch)
        steps += [batches[i:i + settings.grad_accum] for i in range(0, len(batches), settings.grad_accum)]
        epoch += 1
        if limit is None and epoch >= settings.epochs:
            return steps
        if limit is not None and len(steps) >= limit:
            return steps[:limit]


def plateaued(history: list[dict], settings, total: int) -> bool:
    """The stop rule: past half the plan, the recent mean loss is below stop_loss."""
    window = settings.stop_window
    if settings.stop_loss <= 0 or len(history) < max(window, total // 2) or settings.max_steps is not None:
        return False
    return sum(h["loss"] for h in history[-window:]) / window < settings.stop_loss


def _save_checkpoint(path: Path, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT)


def _load_checkpoint(path: Path | None) -> dict | None:
    if path is None or not (path / CHECKPOINT).is_file():
        return None
    try:
        return torch.load(path / CHECKPOINT, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as exc:  # a torn or foreign file: start over rather than crash
        log.warning("ignoring unreadable checkpoint", path=str(path), error=str(exc))
        return None


def _pair_batches(pairs: list, size: int, seed: int):
    """Preference pairs for each step: a seeded shuffle, cycled (every pair before any repeats)."""
    import random

    order, epoch = [], 0
    while True:
        if len(order) < size:
            more = list(range(len(pairs)))
            random.Random(f"{seed}:pairs:{epoch}").shuffle(more)
            order, epoch = order + more, epoch + 1
        chunk, order = order[:size], order[size:]
        yield [pairs[i] for i in chunk]


def train_lora(model, encoded: list[Encoded], settings, *, device: torch.device, bf16: bool, pad_id: int,
               checkpoint_dir: Path | None = None, on_step: StepHook | None = None,
               progress: bool = True, n_facts: int | None = None, pairs: list | None = None) -> TrainResult:
    """SFT on `encoded`; with FLYWHEEL_OBJECTIVE sft+dpo (`pairs`: preference.Pair) or kto (`pairs`:
    preference.Unpaired answers), each step also adds FLYWHEEL_PREFERENCE_WEIGHT × the DPO (or
    KTO) loss of a batch of them."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from trainer.preference import dpo_step_loss, kto_step_loss

    torch.manual_seed(settings.seed)
    lengths = [len(e) for e in encoded]
    steps = plan_steps(lengths, settings, n_facts)
    total = len(steps)
    optimizer = make_optimizer(model.parameters(), settings, lr=effective_lr(settings, total))
    scheduler = make_scheduler(optimizer, settings, total)
    result = TrainResult(steps=total, padding_waste=padding_waste([b for s in steps for b in s], lengths))
    start = 0
    state = _load_checkpoint(checkpoint_dir)
    if state is not None and state.get("total") == total:
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, result.history, result.resumed_from = state["step"], state["history"], state["step"]
        log.info("resuming from checkpoint", step=start, total=total, path=str(checkpoint_dir))
    objective = getattr(settings, "objective", "sft")
    preference = (dpo_step_loss if objective == "sft+dpo" else kto_step_loss) if objective != "sft" and pairs else None
    pair_source = _pair_batches(pairs, settings.preference_batch_size, settings.seed) if preference else None
    for _ in range(start if preference else 0):  # a resumed run continues the same pair order
        next(pair_source)
    checkpointing = Checkpointing(model, use_checkpointing(device, settings.activation_checkpointing),
                                  settings.checkpoint_above_tokens)
    model.train()
    t0 = time.perf_counter()
    with tqdm(total=total, initial=start, desc="training", unit="step", disable=not progress or None,
              dynamic_ncols=True) as bar, frozen_weights_in_bf16(model, bf16):
        for step in range(start, total):
            micro = steps[step]
            items = [[encoded[i] for i in b] for b in micro]
            step_targets = sum(max(0, sum(1 for x in e.labels[1:] if x != IGNORE)) for b in items for e in b)
            if step_targets == 0:
                raise TrainingError("a batch has no target tokens (empty answers?)")
            loss_sum = 0.0
            for batch_items in items:
                batch = {k: v.to(device) for k, v in collate(batch_items, pad_id).items()}
                checkpointing.for_batch(batch["input_ids"].numel())
                with autocast(device, bf16):
                    loss, _n = answer_loss(model, batch)
                (loss / step_targets).backward()
                loss_sum += float(loss.detach())
                result.tokens += sum(len(e) for e in batch_items)
            result.target_tokens += step_targets
            pref_loss = None
            if preference is not None:
                with autocast(device, bf16):
                    pref = preference(model, next(pair_source), pad_id, settings.preference_beta, device)
                (settings.preference_weight * pref).backward()
                pref_loss = float(pref.detach())
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = loss_sum / step_targets
            if not math.isfinite(step_loss):
                raise TrainingError(f"training loss became {step_loss} at step {step + 1}; lower the learning rate")
            elapsed = time.perf_counter() - t0
            point = {"loss": round(step_loss, 5), "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": round(result.tokens / elapsed, 1) if elapsed else 0.0}
            if pref_loss is not None:
                point[objective.split("+")[-1]] = round(pref_loss, 5)  # "dpo" / "kto"
            result.history.append({"step": step + 1, **point})
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            done = step + 1
            if on_step and (done % settings.log_every == 0 or done == total):
                on_step(done, total, point)
            if done < total and plateaued(result.history, settings, total):
                log.info("loss plateaued; stopping early", step=done, planned=total)
                if on_step:
                    on_step(total, total, point)
                result.stopped_early_at = done
                break
            if checkpoint_dir is not None and done % settings.checkpoint_every == 0 and done < total:
                _save_checkpoint(checkpoint_dir, {
                    "step": done, "total": total, "history": result.history,
                    "adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()})
    result.seconds = time.perf_counter() - t0
    result.checkpointed_batches = checkpointing.checkpointed
    model.eval()
    return result


def clear_checkpoint(checkpoint_dir: Path | None) -> None:
    if checkpoint_dir is not None and checkpoint_dir.exists():
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def save_adapter(model, target: Path) -> str:
    """PEFT format with safetensors; returns the adapter's sha256 (flywheel.adapters contract)."""
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(target), safe_serialization=True)
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if config.get("modules_to_save"):
        raise TrainingError(f"adapter has modules_to_save={config['modules_to_save']}; vLLM cannot load that")
    # PEFT writes "all-linear" resolved to full module paths; the plain list of layer names
    # (q_proj, …) targets the same modules and is the form every loader (PEFT, vLLM) accepts.
    modules = config.get("target_modules")
    if isinstance(modules, list):
        config["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in modules})
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return adapter_digest(target)
