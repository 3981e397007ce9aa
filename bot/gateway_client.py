"""The gateway's OpenAI-compatible HTTP API, as the bot uses it: one chat completion per
question (streamed as SSE when asked), plus the admin hook that makes replicas swap at once."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bot import metrics
from bot.settings import BotSettings
from flywheel.logs import describe_exception, get_logger

log = get_logger("bot.gateway_client")

VERSION_HEADER = "X-Flywheel-Model-Version"


RETRY_FIRST_S, RETRY_MAX_S = 0.2, 2.0  # backoff between retries of a refused connection


class GatewayError(Exception):
    """The gateway could not answer (down, timed out, refused, broke off, or sent garbage).
    `kind` is short and never holds text from the gateway: it is what logs show."""

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class _NotYet(Exception):
    """The gateway is not serving yet (connection refused, or 503 while its model loads):
    nothing was generated, so asking again is safe."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def _check_status(resp: httpx.Response) -> None:
    if resp.status_code == 200:
        return
    message = f"gateway answered {resp.status_code}: {_error_message(resp)}"
    if resp.status_code == 503:  # not ready: loading its model after a restart
        raise _NotYet(message, kind="unavailable")
    raise GatewayError(message, kind=f"status {resp.status_code}")


def _show(on_delta: Callable[[str], None], text: str) -> None:
    """Progress is best effort: a failing display never fails the answer (nor passes for garbage)."""
    try:
        on_delta(text)
    except Exception as exc:  # noqa: BLE001
        log.warning("progress display failed", error=describe_exception(exc))


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

    def chat(self, messages: list[dict], on_delta: Callable[[str], None] | None = None,
             deadline: float | None = None, model: str | None = None) -> Answer:
        """Ask the production model (or `model`, e.g. a canary); `on_delta(text_so_far)` is called
        as tokens stream in. `deadline` (time.monotonic()) bounds the whole call, retries included."""
        s = self.settings
        body = {"model": model or s.gateway_model, "messages": messages, "max_tokens": s.max_tokens,
                "temperature": s.temperature, "stream": s.stream}
        started = time.perf_counter()
        text, version, finish = self._with_retries(body, on_delta, deadline)
        return Answer(text=text.strip(), model_version=version,
                      latency_ms=round((time.perf_counter() - started) * 1000, 1), finish_reason=finish)

    def _with_retries(self, body: dict, on_delta, deadline: float | None) -> tuple[str, str | None, str | None]:
        """A refused connection or a 503 is a gateway (re)starting: wait a little and ask again,
        within FLYWHEEL_GATEWAY_CONNECT_RETRY_S and the answer's deadline. Nothing else is
        retried (a request the gateway took may be generating)."""
        give_up = time.monotonic() + self.settings.gateway_connect_retry_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        pause = RETRY_FIRST_S
        while True:
            try:
                return self._ask(body, on_delta, deadline)
            except _NotYet as exc:
                if time.monotonic() + pause > give_up:
                    metrics.GATEWAY_RETRIES.labels("gave_up").inc()
                    raise GatewayError(str(exc), kind=exc.kind) from exc
                metrics.GATEWAY_RETRIES.labels("retried").inc()
                log.info("gateway not serving yet; retrying", reason=exc.kind, wait_s=pause)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX_S)

    def _ask(self, body: dict, on_delta, deadline: float | None) -> tuple[str, str | None, str | None]:
        s = self.settings
        timeout = s.gateway_timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise GatewayError("the answer's deadline passed before the gateway answered", kind="deadline")
        try:
            if s.stream:
                return self._stream(body, on_delta, timeout, deadline)
            return self._once(body, timeout)
        except httpx.ConnectError as exc:
            raise _NotYet(f"cannot reach the gateway at {self.base}: {exc}", kind="refused") from exc
        except httpx.TimeoutException as exc:
            raise GatewayError(f"the gateway did not answer within {timeout:g}s", kind="timeout") from exc
        except httpx.HTTPError as exc:
            raise GatewayError(f"lost the gateway at {self.base}: {exc}", kind="broken") from exc
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:  # JSON of the wrong shape
            raise GatewayError(f"the gateway sent a malformed answer ({type(exc).__name__})",
                               kind="malformed") from exc

    def _once(self, body: dict, timeout: float) -> tuple[str, str | None, str | None]:
        resp = self.http.post(f"{self.base}/v1/chat/completions", json=body, timeout=timeout,
                              headers=self._headers(self.settings.gateway_api_key))
        _check_status(resp)
        data = resp.json()
        choice = (data.get("choices") or [{}])[0]
        version = resp.headers.get(VERSION_HEADER) or data.get("model")
        content = (choice.get("message") or {}).get("content") or ""
        if not isinstance(content, str):
            raise TypeError("content is not text")
        return content, version, choice.get("finish_reason")

    def _stream(self, body: dict, on_delta, timeout: float,
                deadline: float | None) -> tuple[str, str | None, str | None]:
        parts: list[str] = []
        version = finish = None
        with self.http.stream("POST", f"{self.base}/v1/chat/completions", json=body, timeout=timeout,
                              headers=self._headers(self.settings.gateway_api_key)) as resp:
            if resp.status_code != 200:
                resp.read()
                _check_status(resp)
            version = resp.headers.get(VERSION_HEADER)
            for line in resp.iter_lines():
                if deadline is not None and time.monotonic() > deadline:
                    raise GatewayError("the answer's deadline passed mid-answer", kind="deadline")
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise GatewayError(f"gateway sent a malformed stream chunk: {payload[:80]!r}",
                                       kind="malformed") from exc
                if not isinstance(chunk, dict):
                    raise TypeError("stream chunk is not an object")
                if "error" in chunk:
                    raise GatewayError(f"gateway failed mid-answer: {(chunk['error'] or {}).get('message')}",
                                       kind="stream error")
                version = version or chunk.get("model")
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        if not isinstance(delta, str):
                            raise TypeError("delta is not text")
                        parts.append(delta)
                        if on_delta:
                            _show(on_delta, "".join(parts))
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
