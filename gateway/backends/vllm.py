"""The vLLM engine: one or more vLLM OpenAI servers behind the gateway.

Adapters are loaded on every server with POST /v1/load_lora_adapter under their immutable
version name (never reused for other weights: vLLM keeps prefix-cache blocks by name);
requests are forwarded with model=<version> (or the server's base model name) and streamed
through, each chunk relabelled as bytes (gateway.sse.Relabel). A server that restarted has lost
its adapters: the periodic check, and any 404 for a version we loaded, put them back. An
unreachable vLLM gives a 503 that says so."""
from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from flywheel.adapters import AdapterError
from flywheel.logs import get_logger
from gateway.backends.base import Backend, Endpoint, Request
from gateway.errors import GatewayError, bad_request, unavailable
from gateway.sse import Relabel, StreamError

log = get_logger("gateway.vllm")
# aiohttp, not httpx, for the forwarding client: about 1 ms less CPU per request, which the
# engine sharing this machine's cores gets back (see bench/gateway/run.py).
TRANSPORT_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# The only request fields that reach vLLM (after gateway.limits clamped max_tokens); the schemas
# refuse anything else, and this list keeps it so even if a schema grows a field.
_COMMON = ("max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
           "frequency_penalty", "presence_penalty")
FORWARDED = {"chat": (*_COMMON, "logprobs", "top_logprobs"), "completions": (*_COMMON, "prompt", "echo", "logprobs")}
JSON_HEADERS = {"Content-Type": "application/json"}


def _encode(body: dict) -> bytes:
    """orjson; it refuses integers past 64 bits (a client's `seed`), which json still encodes
    for vLLM to judge, as before."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class _Server:
    url: str
    healthy: bool = True
    adapters: set[str] = field(default_factory=set)
    last_error: str | None = None


def _vllm_error(status: int, text: str, server: str) -> GatewayError:
    """vLLM's error body (either of its shapes) as our OpenAI-shaped error, same status for 4xx."""
    try:
        body = orjson.loads(text)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    err = body.get("error") if isinstance(body.get("error"), dict) else body
    message = str(err.get("message") or text[:500] or f"HTTP {status}")
    code = err.get("code") if isinstance(err.get("code"), str) else None
    lowered = message.lower()
    if any(s in lowered for s in ("maximum context length", "max_model_len", "maximum model length")):
        code = "context_length_exceeded"
    elif status == 404 and "does not exist" in lowered:
        code = "model_not_found"
    if status < 500:
        param = err.get("param") if isinstance(err.get("param"), str) else None
        return GatewayError(status, message, code=code, param=param)
    log.warning("vllm_error", url=server, status=status, error=message[:300])
    return GatewayError(502, f"the vLLM backend failed (HTTP {status})", type="server_error", code="backend_error")


class VLLMBackend(Backend):
    kind = "vllm"

    def __init__(self, settings) -> None:
        super().__init__()
        if not settings.vllm_urls:
            raise ValueError("the vllm backend needs FLYWHEEL_VLLM_URLS")
        self.settings = settings
        self.servers = [_Server(url) for url in settings.vllm_urls]
        self._rr = itertools.cycle(range(len(self.servers)))
        self.base_name = settings.vllm_base_name
        self.paths: dict[str, Path] = {}  # adapters we loaded, to restore them on restarted servers
        self.client: aiohttp.ClientSession | None = None  # made on the event loop, in start()
        self._restoring: dict[tuple[str, str], asyncio.Task] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Wait (forever, cancellable) until one vLLM server answers; learn its base model name."""
        if self.client is None:
            key = self.settings.vllm_api_key
            self.client = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {key}"} if key else None,
                timeout=aiohttp.ClientTimeout(total=self.settings.vllm_timeout_s, sock_connect=5.0),
                connector=aiohttp.TCPConnector(limit=2000, keepalive_timeout=60),
                json_serialize=lambda obj: orjson.dumps(obj).decode())
        delay = 0.5
        while True:
            for server in self.servers:
                try:
                    models = await self._models(server)
                except GatewayError as exc:
                    self.error = f"waiting for vLLM: {exc.message}"
                    continue
                if self.base_name is None:
                    roots = [m["id"] for m in models if not m.get("parent")]
                    if not roots:
                        self.error = f"vLLM at {server.url} lists no base model"
                        continue
                    self.base_name = roots[0]
                self.ready, self.error = True, None
                log.info("vllm_connected", url=server.url, base=self.base_name)
                return
            log.warning("vllm_waiting", error=self.error)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        for task in self._restoring.values():
            task.cancel()
        if self.client is not None:
            await self.client.close()

    async def _models(self, server: _Server) -> list[dict]:
        try:
            async with self.client.get(f"{server.url}/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                status, text = resp.status, await resp.text()
        except TRANSPORT_ERRORS as exc:
            self._down(server, exc)
            raise self._unreachable([server]) from exc
        if status != 200:
            raise _vllm_error(status, text, server.url)
        server.healthy, server.last_error = True, None
        return orjson.loads(text).get("data", [])

    def _down(self, server: _Server, exc: Exception) -> None:
        if server.healthy:
            log.warning("vllm_unreachable", url=server.url, error=f"{type(exc).__name__}: {exc}")
        server.healthy = False
        server.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    def _unreachable(self, servers: list[_Server]) -> GatewayError:
        """For the client: unavailable, retry. Which server and why is in the log and /admin/status."""
        return unavailable(f"vLLM backend unavailable ({len(servers) or len(self.servers)} server(s) unreachable). "
                           "Retry shortly.", code="backend_unavailable")

    # ---- adapters --------------------------------------------------------------------------
    async def _load_on(self, server: _Server, name: str, path: Path) -> None:
        async with self.client.post(f"{server.url}/v1/load_lora_adapter",
                                    json={"lora_name": name, "lora_path": str(Path(path).resolve())}) as resp:
            status, text = resp.status, await resp.text()
        if status == 200 or (status == 400 and "already" in text.lower()):
            server.adapters.add(name)
            return
        raise AdapterError(f"vLLM at {server.url} refused adapter {name}: {_vllm_error(status, text, server.url).message}")

    async def load_adapter(self, name: str, path: Path) -> None:
        reached = []
        for server in self.servers:
            try:
                await self._load_on(server, name, path)
                reached.append(server)
            except TRANSPORT_ERRORS as exc:
                self._down(server, exc)  # it gets the adapter from check() once it is back
            except AdapterError:
                for done in reached:  # leave no half-loaded version behind
                    await self._unload_on(done, name)
                raise
        if not reached:
            detail = "; ".join(f"{s.url} ({s.last_error})" for s in self.servers)
            raise AdapterError(f"cannot reach any vLLM server: {detail}")
        self.paths[name] = Path(path)

    async def _unload_on(self, server: _Server, name: str) -> None:
        try:
            async with self.client.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}) as resp:
                if resp.status != 200:
                    log.warning("vllm_unload_refused", url=server.url, version=name, body=(await resp.text())[:300])
        except TRANSPORT_ERRORS as exc:
            self._down(server, exc)
        server.adapters.discard(name)

    async def unload_adapter(self, name: str) -> None:
        self.paths.pop(name, None)
        await asyncio.gather(*(self._unload_on(s, name) for s in self.servers))

    async def check(self, loaded: list[str]) -> None:
        """Mark servers up or down and give restarted ones back the adapters they lost."""
        for server in self.servers:
            try:
                names = {m["id"] for m in await self._models(server)}
            except GatewayError:
                continue
            for name in loaded:
                if name not in names and name in self.paths:
                    log.info("vllm_restoring_adapter", url=server.url, version=name)
                    server.adapters.discard(name)
                    try:
                        await self._load_on(server, name, self.paths[name])
                    except (AdapterError, *TRANSPORT_ERRORS) as exc:
                        log.warning("vllm_restore_failed", url=server.url, version=name, error=str(exc))

    # ---- requests --------------------------------------------------------------------------
    def _order(self) -> list[_Server]:
        """Round-robin over healthy servers first, then the others (one may be back)."""
        start = next(self._rr)
        ring = self.servers[start:] + self.servers[:start]
        return [s for s in ring if s.healthy] + [s for s in ring if not s.healthy]

    def _body(self, version: str | None, endpoint: Endpoint, req: Request, stream: bool) -> dict:
        """The upstream request, built from the allow-list (FORWARDED) only."""
        fields = req.model_dump(exclude_none=True)
        body = {k: fields[k] for k in FORWARDED[endpoint] if k in fields}
        if endpoint == "chat":
            try:
                body["messages"] = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                                    for m in req.messages]
            except ValueError as exc:
                raise bad_request(str(exc), param="messages") from exc
        body["model"] = version or self.base_name
        body["stream"] = stream
        return body

    async def _restore(self, server: _Server, version: str) -> bool:
        """A 404 for a version we loaded: the server restarted. Load it again (once at a time)."""
        if version not in self.paths:
            return False
        key = (server.url, version)
        task = self._restoring.get(key)
        if task is None:
            task = asyncio.create_task(self._load_on(server, version, self.paths[version]))
            self._restoring[key] = task
            task.add_done_callback(lambda _t: self._restoring.pop(key, None))
        try:
            await asyncio.shield(task)
            return True
        except (AdapterError, *TRANSPORT_ERRORS) as exc:
            log.warning("vllm_restore_failed", url=server.url, version=version, error=str(exc))
            return False

    async def generate(self, version: str | None, endpoint: Endpoint, req: Request) -> dict:
        if not self.ready:
            raise unavailable("connecting to vLLM; retry shortly", code="backend_unavailable")
        body = _encode(self._body(version, endpoint, req, stream=False))
        tried = []
        for server in self._order():
            for attempt in range(2):
                try:
                    resp = await self.client.post(f"{server.url}{PATHS[endpoint]}", data=body,
                                                  headers=JSON_HEADERS)
                    try:
                        status, raw = resp.status, await resp.read()
                    except BaseException:
                        resp.close()  # the client left (or the read failed): vLLM aborts the generation
                        raise
                    resp.release()
                except TRANSPORT_ERRORS as exc:
                    self._down(server, exc)
                    tried.append(server)
                    break
                server.healthy = True
                if status == 200:
                    return orjson.loads(raw)
                if status == 404 and version and attempt == 0 and await self._restore(server, version):
                    continue
                raise _vllm_error(status, raw.decode(errors="replace"), server.url)
        raise self._unreachable(tried)

    async def sse(self, version: str | None, endpoint: Endpoint, req: Request,
                  label: str) -> AsyncIterator[tuple[bytes, dict | None]]:
        """vLLM's own stream, relabelled chunk by chunk as bytes (most need no JSON decode)."""
        if not self.ready:
            raise unavailable("connecting to vLLM; retry shortly", code="backend_unavailable")
        body = self._body(version, endpoint, req, stream=True)
        relabel = Relabel(body["model"], label)  # vLLM names the model as we did
        body = _encode(body)
        tried = []
        for server in self._order():
            for attempt in range(2):
                try:
                    resp = await self.client.post(f"{server.url}{PATHS[endpoint]}", data=body,
                                                  headers=JSON_HEADERS)
                except TRANSPORT_ERRORS as exc:
                    self._down(server, exc)
                    tried.append(server)
                    break
                server.healthy = True
                finished = False
                try:
                    if resp.status != 200:
                        text = await resp.text()
                        if resp.status == 404 and version and attempt == 0 and await self._restore(server, version):
                            continue
                        raise _vllm_error(resp.status, text, server.url)
                    async for item in self._chunks(resp, server, relabel):
                        yield item
                    finished = True
                    return
                finally:
                    # A client that left mid-stream: drop the connection so vLLM aborts the generation.
                    resp.release() if finished or resp.status != 200 else resp.close()
        raise self._unreachable(tried)

    @staticmethod
    async def _chunks(resp: aiohttp.ClientResponse, server: _Server,
                      relabel: Relabel) -> AsyncIterator[tuple[bytes, dict | None]]:
        try:
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return
                yield relabel(data)
        except StreamError as exc:
            log.warning("vllm_stream_error", url=server.url, error=str(exc)[:300])
            raise GatewayError(502, "the vLLM backend failed mid-stream", type="server_error",
                               code="backend_error") from None
        except TRANSPORT_ERRORS as exc:
            log.warning("vllm_stream_dropped", url=server.url, error=type(exc).__name__)
            raise GatewayError(502, "the vLLM backend dropped the stream", type="server_error",
                               code="backend_error") from exc

    def status(self) -> dict:
        return {**super().status(), "base_name": self.base_name,
                "servers": [{"url": s.url, "healthy": s.healthy, "error": s.last_error,
                             "adapters": sorted(s.adapters)} for s in self.servers]}
