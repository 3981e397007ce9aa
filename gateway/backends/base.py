"""The interface every serving engine implements: generate, stream, load and unload adapters.

`version` is an immutable adapter version name, or None for the base model. Requests are the
validated pydantic bodies; results are OpenAI-shaped dicts (the app stamps the `model` field)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from gateway.schemas import ChatCompletionRequest, CompletionRequest

Endpoint = Literal["chat", "completions"]
Request = ChatCompletionRequest | CompletionRequest


class Backend(ABC):
    kind: str = "abstract"

    def __init__(self) -> None:
        self.ready = False
        self.error: str | None = None  # why the backend is not ready, for /readyz
        self.on_discarded = lambda tokens: None  # told how many tokens a hung-up client cost

    @abstractmethod
    async def start(self) -> None:
        """Load the base model (or connect to the engine); sets `ready`."""

    async def close(self) -> None:
        """Release threads, connections."""

    @abstractmethod
    async def load_adapter(self, name: str, path: Path) -> None:
        """Make adapter `name` servable; raises AdapterError (or GatewayError) on failure."""

    @abstractmethod
    async def unload_adapter(self, name: str) -> None:
        """Free adapter `name`; callers make sure no request still uses it."""

    @abstractmethod
    async def generate(self, version: str | None, endpoint: Endpoint, req: Request) -> dict:
        """One whole completion, OpenAI-shaped."""

    @abstractmethod
    def stream(self, version: str | None, endpoint: Endpoint, req: Request) -> AsyncIterator[dict]:
        """OpenAI chunks; errors found before the first chunk are raised from the first step."""

    async def check(self, loaded: list[str]) -> None:
        """Periodic health check; re-create adapters an engine lost (a restarted vLLM server)."""

    def status(self) -> dict:
        return {"kind": self.kind, "ready": self.ready, "error": self.error}
