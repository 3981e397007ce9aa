"""The interface every serving engine implements: generate, stream, load and unload adapters.

`version` is an immutable adapter version name, or None for the base model. Requests are the
validated pydantic bodies; results are OpenAI-shaped dicts (the app stamps the `model` field),
streams reach the client through sse()."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Literal

from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.sse import event

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

    def stream(self, version: str | None, endpoint: Endpoint, req: Request) -> AsyncIterator[dict]:
        """OpenAI chunks; errors found before the first chunk are raised from the first step.
        A backend implements this, or overrides sse() (vLLM relays its server's bytes)."""
        raise NotImplementedError

    async def sse(self, version: str | None, endpoint: Endpoint, req: Request,
                  label: str) -> AsyncIterator[tuple[bytes, dict | None]]:
        """The stream as the client gets it: each chunk as an SSE event with `model` set to
        `label`, with the token usage it carries (None if none). Closing this closes stream()."""
        async with aclosing(self.stream(version, endpoint, req)) as chunks:
            async for chunk in chunks:
                chunk["model"] = label
                yield event(chunk), chunk.get("usage")

    async def check(self, loaded: list[str]) -> None:
        """Periodic health check; re-create adapters an engine lost (a restarted vLLM server)."""

    def status(self) -> dict:
        return {"kind": self.kind, "ready": self.ready, "error": self.error}
