"""Gateway settings, read from the environment (FLYWHEEL_ prefix) so every replica is configured alike."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flywheel.env_lists import split_csv


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    backend: Literal["transformers", "vllm"] = "transformers"
    base_model: Path = Path("models/smollm2-135m-instruct")  # or a Hub id, org/name[@revision] (flywheel.basemodel)
    vllm_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_token: str | None = None
    sync_interval_s: float = Field(default=2.0, gt=0)
    adapters_dir: Path = Path("./adapters")
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-gateway")
    max_new_tokens: int = Field(default=256, ge=1)
    device: str = "auto"
    # transformers backend: generation threads run this much nicer than the event loop, so on a
    # shared machine the event loop (acks, health checks, streams) and a bot next to us come
    # first when both want a core. 0 = same priority.
    generation_nice: int = Field(default=5, ge=0, le=19)
    generation_threads: int | None = Field(default=None, ge=1)  # torch threads per generation; None: torch's default
    inference_bf16: bool = False  # bf16 autocast for generation on CPU, as the trainer's evaluator (flywheel.precision)
    quantize: Literal["4bit"] | None = None  # transformers backend on a GPU: NF4 weights (bitsandbytes)
    # How long a failed adapter load waits before the next try (doubles up to the max).
    retry_backoff_s: float = Field(default=1.0, gt=0)
    retry_backoff_max_s: float = Field(default=60.0, gt=0)
    # Versions besides production and the previous one that requests may load by name (LRU); 0 = none.
    max_extra_versions: int = Field(default=2, ge=0)
    # Seconds an unloaded-to-be version may take to drain its in-flight requests.
    drain_timeout_s: float = Field(default=120.0, gt=0)
    # vLLM: per-request timeout and the model name its server uses for the base model
    # (discovered from GET /v1/models when unset).
    vllm_timeout_s: float = Field(default=300.0, gt=0)
    vllm_base_name: str | None = None
    # Sent as `Authorization: Bearer` to every vLLM server (start vLLM with --api-key / VLLM_API_KEY).
    vllm_api_key: str | None = None
    # Admission: requests handed to the backend at once (unset: 1 for transformers, whose model
    # runs one generation at a time, 64 for vLLM) and requests waiting for a turn; when that
    # line is full the replica answers 429 with Retry-After instead of queueing without end.
    max_concurrent: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=32, ge=0)
    # Largest `n` (choices per request) and whether `logprobs`/`top_logprobs` are accepted:
    # both multiply the work (or the answer) of one request, so they are off unless enabled.
    max_choices: int = Field(default=1, ge=1, le=16)
    # Request bodies larger than this get 413 before anything parses them (the bot sends at most
    # ~6,000 characters of thread; 1 MiB leaves room for long documents in a prompt).
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    allow_logprobs: bool = False

    @field_validator("vllm_urls", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value):
        return split_csv(value)

    @field_validator("api_keys", "admin_token", "vllm_api_key")
    @classmethod
    def _no_placeholders(cls, value):
        for secret in value if isinstance(value, list) else [value]:
            if secret and "change_me" in secret.lower():
                raise ValueError("still the example placeholder (CHANGE_ME): set a real secret")
        return value

    @field_validator("vllm_urls")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"vLLM URL {url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in value]

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if value != "auto" and not (value == "cpu" or value.startswith("cuda") or value == "mps"):
            raise ValueError(f"device {value!r}: use auto, cpu, cuda, cuda:N or mps")
        return value

    def concurrency(self) -> int:
        if self.max_concurrent is not None:
            return self.max_concurrent
        return 64 if self.backend == "vllm" else 1

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
