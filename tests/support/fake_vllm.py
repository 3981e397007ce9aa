"""A stand-in for a vLLM OpenAI server, for fast tests of the gateway's vLLM path: aiohttp on a
loopback socket in its own thread. It answers the way vLLM does (compact JSON with non-ASCII as
is, `model` as it was asked, SSE chunks, a usage chunk when asked for; errors inside a stream
written by json.dumps, spaces and all), or sends the stream a test scripts, and keeps the
request bodies it got."""
from __future__ import annotations

import asyncio
import json
import threading

from aiohttp import web

from tests.support.net import listening_socket, port_of


def compact(obj: dict) -> bytes:
    """As vLLM's pydantic writes a chunk."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class FakeVLLM:
    def __init__(self, served_name: str = "tiny-llama", pieces: tuple[str, ...] = ("Hel", "lo")) -> None:
        self.served_name = served_name
        self.pieces = pieces  # the completion text, one piece per stream chunk
        self.received: list[dict] = []
        self.script: list[bytes] | None = None  # `data:` payloads to stream instead of the usual ones
        self.sock = listening_socket()
        self.url = f"http://127.0.0.1:{port_of(self.sock)}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-vllm", daemon=True)
        self.runner: web.AppRunner | None = None

    def start(self) -> FakeVLLM:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    async def _models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.served_name, "object": "model",
                                                              "parent": None}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append(body)
        chat = request.path.endswith("/chat/completions")
        head = {"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
                "model": body["model"]}
        usage = {"prompt_tokens": 7, "total_tokens": 7 + len(self.pieces), "completion_tokens": len(self.pieces)}
        if not body.get("stream"):
            text = "".join(self.pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text})
            answer = {**head, "object": "chat.completion" if chat else "text_completion",
                      "choices": [{**choice, "logprobs": None, "finish_reason": "length"}], "usage": usage}
            return web.Response(body=compact(answer), content_type="application/json")
        payloads = self.script
        if payloads is None:
            deltas = [{"role": "assistant", "content": ""}] if chat else []
            deltas += [{"content": p} if chat else {"text": p} for p in self.pieces]
            payloads = [compact({**head, "choices": [{"index": 0, **({"delta": d} if chat else d),
                                                      "logprobs": None, "finish_reason": None}]})
                        for d in deltas]
            payloads.append(compact({**head, "choices": [{"index": 0, **({"delta": {}} if chat else {"text": ""}),
                                                          "logprobs": None, "finish_reason": "length"}]}))
            if (body.get("stream_options") or {}).get("include_usage"):
                payloads.append(compact({**head, "choices": [], "usage": usage}))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for payload in [*payloads, b"[DONE]"]:
            await resp.write(b"data: " + payload + b"\n\n")
        await resp.write_eof()
        return resp
