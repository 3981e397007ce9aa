"""The gateway's OpenAI-compatible HTTP API, as the bot uses it: one chat completion per
question (streamed as SSE when asked), plus the admin hook that makes replicas swap at once."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bot.settings import BotSettings

VERSION_HEADER = "X-Flywheel-Model-Version"


class GatewayError(Exception):
    """The gateway could not answer (down, timed out, refused, or broke off)."""


@dataclass
class Answer:
    text: str
    model_version: str | None
    latency_ms: float
    finish_reason: str | None = None


def _error_message(resp: httpx.Response) -> str:
    try:
        return resp.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return resp.text[:200] or resp.reason_phrase


class GatewayClient:
    """Thread-safe (one pooled httpx.Client); every failure becomes a GatewayError."""

    def __init__(self, settings: BotSettings, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.base = settings.gateway_url.rstrip("/")
        timeout = httpx.Timeout(settings.gateway_timeout_s, connect=5.0)
        self.http = client or httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=64))

    def close(self) -> None:
        self.http.close()

    def _headers(self, token: str | None) -> dict:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def chat(self, messages: list[dict], on_delta: Callable[[str], None] | None = None) -> Answer:
        """Ask the production model; `on_delta(text_so_far)` is called as tokens stream in."""
        s = self.settings
        body = {"model": s.gateway_model, "messages": messages, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "stream": s.stream}
        started = time.perf_counter()
        try:
            if s.stream:
                text, version, finish = self._stream(body, on_delta)
            else:
                text, version, finish = self._once(body)
        except httpx.TimeoutException as exc:
            raise GatewayError(f"the gateway did not answer within {s.gateway_timeout_s:g}s") from exc
        except httpx.HTTPError as exc:
            raise GatewayError(f"cannot reach the gateway at {self.base}: {exc}") from exc
        return Answer(text=text.strip(), model_version=version,
                      latency_ms=round((time.perf_counter() - started) * 1000, 1), finish_reason=finish)

    def _once(self, body: dict) -> tuple[str, str | None, str | None]:
        resp = self.http.post(f"{self.base}/v1/chat/completions", json=body,
                              headers=self._headers(self.settings.gateway_api_key))
        if resp.status_code != 200:
            raise GatewayError(f"gateway answered {resp.status_code}: {_error_message(resp)}")
        data = resp.json()
        choice = (data.get("choices") or [{}])[0]
        version = resp.headers.get(VERSION_HEADER) or data.get("model")
        return (choice.get("message") or {}).get("content") or "", version, choice.get("finish_reason")

    def _stream(self, body: dict, on_delta) -> tuple[str, str | None, str | None]:
        parts: list[str] = []
        version = finish = None
        with self.http.stream("POST", f"{self.base}/v1/chat/completions", json=body,
                              headers=self._headers(self.settings.gateway_api_key)) as resp:
            if resp.status_code != 200:
                resp.read()
                raise GatewayError(f"gateway answered {resp.status_code}: {_error_message(resp)}")
            version = resp.headers.get(VERSION_HEADER)
            for line in resp.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise GatewayError(f"gateway sent a malformed stream chunk: {payload[:80]!r}") from exc
                if "error" in chunk:
                    raise GatewayError(f"gateway failed mid-answer: {chunk['error'].get('message')}")
                version = version or chunk.get("model")
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        parts.append(delta)
                        if on_delta:
                            on_delta("".join(parts))
                    finish = choice.get("finish_reason") or finish
        return "".join(parts), version, finish

    def request_sync(self) -> str:
        """Ask the gateway to pick up an alias move now instead of at its next poll."""
        token = self.settings.gateway_admin_token
        if not token:
            return "not asked (FLYWHEEL_GATEWAY_ADMIN_TOKEN unset); replicas pick it up at their next poll"
        try:
            resp = self.http.post(f"{self.base}/admin/sync", headers=self._headers(token), timeout=60.0)
        except Exception as exc:  # noqa: BLE001 - the alias already moved: never let the nudge undo the reply
            return f"could not reach the gateway ({exc}); replicas pick it up at their next poll"
        if resp.status_code != 200:
            return f"gateway sync answered {resp.status_code}: {_error_message(resp)}"
        return "gateway synced"
