"""Trainer settings, all from the environment (FLYWHEEL_ prefix): paths, hyperparameters,
gate thresholds and the watch schedule. Defaults are sized for a CPU laptop."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flywheel.env_lists import split_csv
from flywheel.prompt import PromptSettings

# A whole bot prompt in tokens: SmolLM2's tokenizer takes 3.8 characters a token on the demo's
# facts, 3.3 on README.md (code, tables); 3 leaves room for the team's notes besides. Answers: the
# bot's and the gateway's max_tokens (256).
CHARS_PER_TOKEN = 3
ANSWER_TOKENS = 256


def bot_context_tokens(prompt: PromptSettings) -> int:
    """Tokens an item needs to hold what the bot sends (context_max_chars) and its answer: 2256
    by default, so a full thread trains whole while CPU micro-batches stay within batch_tokens."""
    return -(-prompt.context_max_chars // CHARS_PER_TOKEN) + ANSWER_TOKENS


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    # Paths
    base_model: str = "models/smollm2-135m-instruct"  # or a Hub id, org/name[@revision] (flywheel.basemodel)
    adapters_dir: Path = Path("./adapters")
    runs_dir: Path = Path("./runs")  # checkpoints, reports (JSON + PNG)
    data_dir: Path = Path("./data")  # dataset snapshots and exports
    gateway_url: str | None = None  # only for paraphrase augmentation
    gateway_api_key: str | None = None

    # Dataset building
    # The bot's admins (FLYWHEEL_ADMINS): their votes, corrections, labels and golden marks weigh
    # more. Read at each build, so a removed admin's old votes count as anyone's (trainer.targets).
    admins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_chars: int = Field(4000, ge=10)  # items longer than this (question or answer) are dropped
    # Share of the *never-taught* items (answers people only voted up) kept out of training as a
    # regression check; what people taught (corrections, imports, curated items) always trains.
    eval_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    augment_templates: int = Field(3, ge=0, le=6)  # rule paraphrases learned per taught question
    recall_paraphrases: int = Field(2, ge=0, le=3)  # held-out rule paraphrases per taught question
    near_dup_threshold: float = Field(0.8, gt=0.0, le=1.0)  # MinHash Jaccard
    minhash_perms: int = Field(128, ge=16)
    train_on_golden: bool = True  # golden items are also learned (corrections must stick)
    # Model paraphrases through the gateway (needs FLYWHEEL_GATEWAY_URL; skipped without it): on the
    # demo facts the adapter alone answered rewordings 0.50 → 0.53-0.57 token F1 (bench/learning).
    augment: bool = True
    augment_paraphrases: int = Field(2, ge=1, le=10)  # kept per taught answer, at most
    augment_attempts: int = Field(1, ge=1, le=5)  # requests per taught answer (2: +~65 s in the demo)
    augment_model: str = "production"
    # Model paraphrases further than this (cosine of sentence embeddings) from their question
    # are dropped: they drifted to another question. 0 keeps every line.
    augment_min_similarity: float = Field(0.6, ge=0.0, le=1.0)

    # Beside SFT: sft+dpo adds DPO on (taught answer, voted-down answer) pairs; kto adds KTO on the
    # same answers taken apart (desirable / undesirable). Reference: the base model.
    objective: Literal["sft", "sft+dpo", "kto"] = "sft"
    preference_beta: float = Field(0.1, gt=0.0)
    preference_weight: float = Field(1.0, ge=0.0)  # × the preference loss, added to the SFT loss
    preference_batch_size: int = Field(4, ge=1)  # pairs per optimizer step

    # LoRA and optimisation
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)  # 0 trains ~1.5x faster on CPU (bench/trainer/results.md)
    target_modules: str = "all-linear"  # or a comma list: q_proj,k_proj,v_proj,o_proj
    learning_rate: float = Field(1e-3, gt=0.0)
    lr_schedule: Literal["linear", "cosine", "exponential", "constant"] = "linear"
    lr_decay_gamma: float = Field(0.97, gt=0.0, le=1.0)  # per step, for "exponential"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # SGD only
    max_grad_norm: float = Field(1.0, gt=0.0)
    # Schedule: with neither epochs nor max_steps set, the step count follows the data: each
    # taught fact is seen about `exposures_per_fact` times (with its paraphrases), within
    # [min_steps, max_auto_steps]; training stops early once the loss has plateaued below stop_loss.
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)  # caps epochs when set
    exposures_per_fact: float = Field(16.0, gt=0)
    min_steps: int = Field(60, ge=1)
    max_auto_steps: int = Field(600, ge=1)
    stop_loss: float = Field(0.02, ge=0.0)  # 0 turns the early stop off
    stop_window: int = Field(8, ge=2)
    batch_size: int = Field(8, ge=1)  # sequences per optimizer micro-batch (upper bound)
    batch_tokens: int = Field(4096, ge=64)  # padded tokens per micro-batch (upper bound)
    grad_accum: int = Field(1, ge=1)
    # Tokens per training item, at most the model's own context (trainer.encode.model_limit); longer
    # items lose their oldest context turns, never the system prompt, question or answer.
    max_length: int = Field(default_factory=lambda: bot_context_tokens(PromptSettings()), ge=16)
    seed: int = 0
    device: str = "auto"  # auto / cpu / cuda
    bf16: bool | None = None  # None: bf16 autocast where the hardware has it (CUDA, AVX-512 BF16 / AMX CPUs)
    quantize: Literal["4bit"] | None = None  # QLoRA on a GPU: NF4 base weights (bitsandbytes)
    # None: per micro-batch, on CPU over the next, on a GPU from its free memory (trainer.modeling)
    activation_checkpointing: bool | None = None
    inference_bf16: bool = False  # bf16 autocast for evaluation answers on CPU, as the gateway serves (flywheel.precision)
    checkpoint_above_tokens: int = Field(512, ge=1)  # padded tokens; keeps SmolLM2 under 3 GB peak RSS at batch 8
    checkpoint_every: int = Field(25, ge=1)  # optimizer steps
    # Several processes (accelerate launch / torchrun): how long a rank waits in one exchange with
    # the others (helpers wait this long for rank 0's dataset snapshot) before the run fails.
    distributed_timeout_s: float = Field(1800.0, gt=0.0)
    log_every: int = Field(1, ge=1)  # steps between store progress points
    min_train_examples: int = Field(4, ge=1)

    # Evaluation and gate
    eval_max_new_tokens: int = Field(64, ge=1)  # evaluation answers (the demo: as long as the bot's)
    eval_batch_size: int = Field(16, ge=1)
    max_eval_items: int = Field(200, ge=1)
    golden_pass_f1: float = Field(0.6, ge=0.0, le=1.0)  # a golden answer counts as right at this F1
    gate_min_eval_items: int = Field(5, ge=0)  # recall items (held-out paraphrases of taught facts)
    gate_margin: float = 0.01  # candidate recall F1 (no memory) must beat the reference by this much
    gate_regression_tolerance: float = Field(0.05, ge=0.0)  # never-taught / general / memory-on F1 drop allowed
    gate_min_slice_items: int = Field(5, ge=1)  # a never-taught or general slice this small is reported, not gated
    gate_golden_tolerance: int = Field(0, ge=0)  # golden items production got right and we lost
    gate_max_loss_ratio: float = Field(1.5, gt=0.0)  # candidate eval loss vs base eval loss

    # Scheduling
    lease_ttl_s: float = Field(60.0, gt=1.0)
    heartbeat_s: float = Field(10.0, gt=0.1)
    # No training step or evaluation batch for this long: the run is failed, reported and its lease
    # freed (trainer.lease). Above the slowest step or batch (a 7B's model load and first step on a
    # GPU, or a CPU evaluation batch, take minutes), far below a run's length.
    stall_s: float = Field(1800.0, gt=0.0)
    watch_min_new: int = Field(20, ge=1)  # new examples + feedback since the last run
    watch_cooldown_s: float = Field(3600.0, ge=0.0)
    watch_poll_s: float = Field(30.0, gt=0.0)
    # the longest wait between checks while the database is away, or between retries of a run that could not start
    watch_max_backoff_s: float = Field(300.0, gt=0.0)

    @field_validator("admins", mode="before")
    @classmethod
    def _csv(cls, value):
        return split_csv(value, strip=":")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("target_modules must be 'all-linear' or a comma-separated list")
        return value

    def target_module_list(self) -> list[str] | str:
        """PEFT's form: 'all-linear' or a list of module names (both load in vLLM)."""
        if self.target_modules == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def hyperparams(self) -> dict:
        """What a run records: everything that changes the trained weights."""
        keys = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "lr_schedule",
                "lr_decay_gamma", "warmup_ratio", "optimizer", "weight_decay", "momentum", "max_grad_norm",
                "epochs", "max_steps", "exposures_per_fact", "min_steps", "max_auto_steps", "stop_loss",
                "stop_window", "batch_size", "batch_tokens", "grad_accum", "max_length", "seed", "objective",
                "preference_beta", "preference_weight", "preference_batch_size")
        out = {k: getattr(self, k) for k in keys}
        out["base_model"] = str(self.base_model)
        return out
