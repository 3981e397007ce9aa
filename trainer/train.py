"""The LoRA SFT loop: length-grouped micro-batches, gradient accumulation, warmup + decay,
gradient clipping, a progress bar, progress callbacks (the store's heartbeat) and
checkpoints a later run with the same data and settings resumes from.

Several processes train one adapter when a launcher starts them:
`accelerate launch --config_file deploy/accelerate/ddp.yaml --num_processes N -m flywheel train run`
(trainer/README.md). The engine is Accelerate rather than torchrun with hand-wired DDP: it is
already a dependency; its launcher is torchrun underneath (a rank that dies stops the others);
one config file switches DDP to FSDP (deploy/accelerate/fsdp.yaml) with no code change;
`prepare` builds the right wrapper for what it finds (NCCL on GPUs, gloo on CPUs) and
`get_state_dict` gathers sharded weights. Alone (no launcher, or one process) the loop runs
with no engine in it, exactly as before.

How a step is split: every rank plans the same steps from the same items and seed; each
micro-batch's items are dealt out round-robin (rank r takes items r, r+N, ...), so the global
batch, the optimizer and the schedule are one process's. Each rank scales its summed loss by
N / (the step's target tokens) and the engine averages the gradients: the one-process gradient.
The step losses are summed over the ranks for the history. Measured agreement with one process
(fp32, dropout 0, tests/test_trainer_distributed.py): every step's loss within 9.5e-7 relative
(the test allows 1e-3).
LoRA dropout draws each rank's own masks, so with dropout the curves agree in distribution,
not step by step."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    get_int_from_env,
)
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
    pick_device,
    use_checkpointing,
)
from trainer.optim import make_optimizer, make_scheduler
from trainer.preference import dpo_step_loss, kto_step_loss

log = get_logger("trainer.train")
CHECKPOINT = "checkpoint.pt"
StepHook = Callable[[int, int, dict], None]
# Where launchers put the number of processes: accelerate's own list (accelerate/state.py).
WORLD_SIZE_VARS = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]


class TrainingError(RuntimeError):
    """Training cannot go on (no data, a non-finite loss, a lost lease)."""


@dataclass
class TrainResult:
    steps: int
    history: list[dict] = field(default_factory=list)  # [{"step", "loss", "lr", "tokens_per_s"}]
    tokens: int = 0  # real (non-padding) tokens processed, by all processes together
    target_tokens: int = 0
    seconds: float = 0.0
    padding_waste: float = 0.0
    resumed_from: int = 0
    stopped_early_at: int | None = None
    checkpointed_batches: int = 0  # micro-batches recomputed in backward (modeling.Checkpointing)
    adapter_state: dict | None = None  # FSDP only: the whole adapter, gathered on rank 0 (the model stays sharded)

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


def launched_processes() -> int:
    """How many processes the launcher started for this run (1 without a launcher)."""
    return get_int_from_env(WORLD_SIZE_VARS, 1)


def join_processes(settings) -> Accelerator | None:
    """The engine that joins this process to the others launched with it (accelerate launch,
    torchrun); None when it runs alone, so one process trains with no engine in its loop. A
    collective that waits longer than distributed_timeout_s (a rank died or hangs) fails the run."""
    if launched_processes() <= 1:
        return None
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=settings.distributed_timeout_s))
    return Accelerator(cpu=pick_device(settings.device).type == "cpu", kwargs_handlers=[timeout])


def share_from_rank_0(accelerator: Accelerator, obj):
    """Rank 0's `obj` on every rank (each calls this once with its own; only rank 0's counts)."""
    return broadcast_object_list([obj])[0]


class LossOf(torch.nn.Module):
    """Calls a loss function of the model inside a module's forward, the one the engine wraps: DDP
    prepares its gradient sync there and FSDP gathers the shards, while trainer.modeling's losses
    reach the decoder and head past PEFT's own forward."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        # FSDP's automatic wrapping takes the transformer block classes from here
        self._no_split_modules = getattr(model.get_base_model(), "_no_split_modules", None)

    def forward(self, loss_fn, *args):
        return loss_fn(self.model, *args)


def rank_share(indices: list[int], rank: int, world: int) -> tuple[list[int], float]:
    """This rank's items of a micro-batch, dealt round-robin, and their weight. A rank left with
    none runs the first item at weight 0: the engine needs a backward from every rank."""
    if world == 1:
        return indices, 1.0
    mine = indices[rank::world]
    return (mine, 1.0) if mine else (indices[:1], 0.0)


def _engine(model, optimizer, accelerator: Accelerator | None):
    """(forward, optimizer, sync). Alone: the loss function called on the model itself, the
    optimizer as it is, no context. On several processes: the engine's wrapper around
    LossOf(model), its optimizer, and `sync(last)`, which holds the gradient sync back for every
    pass of a step but the last."""
    if accelerator is None:
        return (lambda loss_fn, *args: loss_fn(model, *args)), optimizer, lambda last: nullcontext()
    wrapped, prepared = accelerator.prepare(LossOf(model), optimizer)
    return wrapped, prepared, lambda last: nullcontext() if last else accelerator.no_sync(wrapped)


def _resume_state(checkpoint_dir: Path | None, total: int, accelerator: Accelerator | None,
                  sharded: bool) -> dict | None:
    """The checkpoint to go on from, if it is for this plan: read by rank 0 and handed to the
    others. None under FSDP, whose optimizer state is sharded (checkpoints are off there)."""
    if sharded:
        return None
    state = _load_checkpoint(checkpoint_dir) if accelerator is None or accelerator.is_main_process else None
    if accelerator is not None:
        state = broadcast_object_list([state])[0]
    return state if state is not None and state.get("total") == total else None


def _summed(accelerator: Accelerator, device: torch.device, *values: float) -> list[float]:
    """The values added up over all ranks (one small all-reduce)."""
    return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=device), reduction="sum").tolist()


def _gathered_adapter(accelerator: Accelerator, wrapped) -> dict | None:
    """FSDP: the whole adapter's weights on rank 0 (every rank takes part in gathering them)."""
    from peft import get_peft_model_state_dict

    full = accelerator.get_state_dict(wrapped)  # LossOf's keys: "model." + the PEFT model's
    if not accelerator.is_main_process:
        return None
    inner = {k.removeprefix("model."): v for k, v in full.items()}
    return get_peft_model_state_dict(accelerator.unwrap_model(wrapped).model, state_dict=inner)


@dataclass
class _Run:
    """What the training loop works with, set up (and resumed from a checkpoint) before it starts."""
    steps: list[list[list[int]]]  # every optimizer step's micro-batches (plan_steps)
    start: int
    rank: int
    world: int
    sharded: bool  # FSDP: no checkpoints, the adapter gathered at the end
    optimizer: torch.optim.Optimizer
    scheduler: object
    forward: Callable  # see _engine
    stepper: object
    sync: Callable
    objective: str  # sft / sft+dpo / kto
    preference: Callable | None  # the DPO or KTO step loss, or None for SFT alone
    pair_source: object  # the preference batches (_pair_batches)
    checkpointing: Checkpointing
    result: TrainResult

    @property
    def total(self) -> int:
        return len(self.steps)


def train_lora(model, encoded: list[Encoded], settings, *, device: torch.device, bf16: bool, pad_id: int,
               checkpoint_dir: Path | None = None, on_step: StepHook | None = None,
               progress: bool = True, n_facts: int | None = None, pairs: list | None = None,
               accelerator: Accelerator | None = None) -> TrainResult:
    """SFT on `encoded`; with FLYWHEEL_OBJECTIVE sft+dpo (`pairs`: preference.Pair) or kto (`pairs`:
    preference.Unpaired answers), each step also adds FLYWHEEL_PREFERENCE_WEIGHT × the DPO (or
    KTO) loss of a batch of them. With `accelerator` (join_processes) this process is one rank of
    a run several train together: it takes its share of every micro-batch (rank_share); rank 0
    alone shows progress and writes checkpoints (on_step is rank 0's to pass)."""
    run = _set_up(model, encoded, settings, device, checkpoint_dir, n_facts, pairs, accelerator)
    result, total, rank, world = run.result, run.total, run.rank, run.world
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = accelerator.clip_grad_norm_ if accelerator else torch.nn.utils.clip_grad_norm_
    model.train()
    t0 = time.perf_counter()
    with tqdm(total=total, initial=run.start, desc="training", unit="step", disable=not progress or rank > 0 or None,
              dynamic_ncols=True) as bar, frozen_weights_in_bf16(model, bf16 and not run.sharded):
        for step in range(run.start, total):
            micro = run.steps[step]
            step_targets = sum(max(0, sum(1 for x in encoded[i].labels[1:] if x != IGNORE)) for b in micro for i in b)
            if step_targets == 0:
                raise TrainingError("a batch has no target tokens (empty answers?)")
            passes = len(micro) + (run.preference is not None)
            loss_sum, tokens = 0.0, 0
            for k, indices in enumerate(micro):
                mine, weight = rank_share(indices, rank, world)
                batch_items = [encoded[i] for i in mine]
                batch = {key: v.to(device) for key, v in collate(batch_items, pad_id).items()}
                run.checkpointing.for_batch(batch["input_ids"].numel())
                with run.sync(k == passes - 1):
                    with autocast(device, bf16):
                        loss, _n = run.forward(answer_loss, batch)
                    (loss * (weight * world) / step_targets).backward()
                loss_sum += float(loss.detach()) * weight
                tokens += sum(len(e) for e in batch_items) if weight else 0
            pref_loss = _preference_pass(run, settings, device, bf16, pad_id) if run.preference else None
            if accelerator is not None:
                loss_sum, tokens = _summed(accelerator, device, loss_sum, tokens)
            result.tokens += int(tokens)
            result.target_tokens += step_targets
            clip(trainable, settings.max_grad_norm)
            run.stepper.step()
            run.scheduler.step()
            run.stepper.zero_grad(set_to_none=True)
            step_loss = loss_sum / step_targets
            if not math.isfinite(step_loss):
                raise TrainingError(f"training loss became {step_loss} at step {step + 1}; lower the learning rate")
            done = step + 1
            point = _record_step(run, settings, bar, on_step, done, step_loss, pref_loss, t0)
            if done < total and plateaued(result.history, settings, total):
                log.info("loss plateaued; stopping early", step=done, planned=total)
                if on_step:
                    on_step(total, total, point)
                result.stopped_early_at = done
                break
            if checkpoint_dir is not None and done % settings.checkpoint_every == 0 and done < total \
                    and rank == 0 and not run.sharded:
                _save_checkpoint(checkpoint_dir, _checkpoint_state(model, run, done))
    return _finish(model, run, accelerator, t0)


def _set_up(model, encoded: list[Encoded], settings, device: torch.device, checkpoint_dir: Path | None,
            n_facts: int | None, pairs: list | None, accelerator: Accelerator | None) -> _Run:
    """Seed, plan the steps, build the optimizer and schedule, go on from a checkpoint for the
    same plan, and wrap the model in the engine when several processes train."""
    from peft import set_peft_model_state_dict  # with transformers, seconds to import: only when training

    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    sharded = accelerator is not None and accelerator.distributed_type == DistributedType.FSDP
    torch.manual_seed(settings.seed + rank)  # rank 0 draws as one process does; the others their own dropout
    lengths = [len(e) for e in encoded]
    steps = plan_steps(lengths, settings, n_facts)
    total = len(steps)
    optimizer = make_optimizer(model.parameters(), settings, lr=effective_lr(settings, total))
    scheduler = make_scheduler(optimizer, settings, total)
    result = TrainResult(steps=total, padding_waste=padding_waste([b for s in steps for b in s], lengths))
    start = 0
    state = _resume_state(checkpoint_dir, total, accelerator, sharded)
    if state is not None:
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if rank == 0:
            torch.set_rng_state(state["rng"])
        start, result.history, result.resumed_from = state["step"], state["history"], state["step"]
        log.info("resuming from checkpoint", step=start, total=total, path=str(checkpoint_dir))
    objective = getattr(settings, "objective", "sft")
    preference = (dpo_step_loss if objective == "sft+dpo" else kto_step_loss) if objective != "sft" and pairs else None
    pair_source = _pair_batches(pairs, settings.preference_batch_size, settings.seed) if preference else None
    for _ in range(start if preference else 0):  # a resumed run continues the same pair order
        next(pair_source)
    forward, stepper, sync = _engine(model, optimizer, accelerator)
    checkpointing = Checkpointing(model, use_checkpointing(device, settings.activation_checkpointing),
                                  settings.checkpoint_above_tokens)
    return _Run(steps=steps, start=start, rank=rank, world=world, sharded=sharded, optimizer=optimizer,
                scheduler=scheduler, forward=forward, stepper=stepper, sync=sync, objective=objective,
                preference=preference,
                pair_source=pair_source, checkpointing=checkpointing, result=result)


def _preference_pass(run: _Run, settings, device: torch.device, bf16: bool, pad_id: int) -> float:
    """The step's last pass: the weighted DPO (or KTO) loss of the next batch of pairs; its loss."""
    with run.sync(True):
        with autocast(device, bf16):
            pref = run.forward(run.preference, next(run.pair_source), pad_id, settings.preference_beta, device)
        (settings.preference_weight * pref).backward()
    return float(pref.detach())


def _record_step(run: _Run, settings, bar, on_step: StepHook | None, done: int, step_loss: float,
                 pref_loss: float | None, t0: float) -> dict:
    """The step in the history, on the progress bar and, every log_every steps and at the end,
    passed to on_step; returns its point."""
    result = run.result
    elapsed = time.perf_counter() - t0
    point = {"loss": round(step_loss, 5), "lr": run.scheduler.get_last_lr()[0],
             "tokens_per_s": round(result.tokens / elapsed, 1) if elapsed else 0.0}
    if pref_loss is not None:
        point[run.objective.split("+")[-1]] = round(pref_loss, 5)  # "dpo" / "kto"
    result.history.append({"step": done, **point})
    bar.update(1)
    bar.set_postfix(loss=f"{step_loss:.3f}")
    if on_step and (done % settings.log_every == 0 or done == run.total):
        on_step(done, run.total, point)
    return point


def _checkpoint_state(model, run: _Run, done: int) -> dict:
    """What a later run with the same plan goes on from (_set_up)."""
    from peft import get_peft_model_state_dict  # with transformers, seconds to import: only when training

    return {"step": done, "total": run.total, "history": run.result.history,
            "adapter": get_peft_model_state_dict(model), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state()}


def _finish(model, run: _Run, accelerator: Accelerator | None, t0: float) -> TrainResult:
    """Time and checkpointed batches into the result; under FSDP the adapter gathered on rank 0."""
    result = run.result
    result.seconds = time.perf_counter() - t0
    result.checkpointed_batches = run.checkpointing.checkpointed
    if run.sharded:
        result.adapter_state = _gathered_adapter(accelerator, run.forward)
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
