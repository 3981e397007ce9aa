"""The embedded engine: one transformers base model with PEFT LoRA adapters loaded by name.

Generation runs in worker threads so the event loop stays free. The active adapter is global
state in a PeftModel, so set_adapter + generate (and load/unload) happen under one lock:
requests may use different adapters and never see each other's weights."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from flywheel.adapters import AdapterError
from flywheel.basemodel import load_causal_lm, load_tokenizer
from flywheel.logs import get_logger
from flywheel.precision import inference_autocast
from flywheel.prompt import chat_format, render
from gateway import openai_format as fmt
from gateway.backends.base import Backend, Endpoint, Request
from gateway.errors import GatewayError, bad_request, unavailable
from gateway.stops import StopTrimmer

log = get_logger("gateway.transformers")


class _Cancelled(Exception):
    pass


def _generation_thread(nice: int, threads: int | None) -> None:
    """Each generation thread: nicer than the event loop, and with its own torch thread count
    (an OpenMP setting is per thread, so it is set in the thread that generates)."""
    _lower_priority(nice)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _lower_priority(nice: int) -> None:
    """Make this generation thread (and the torch worker threads it starts, which inherit it)
    `nice` steps nicer than the event loop. Linux sets niceness per thread; elsewhere a no-op."""
    import os

    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError as exc:
            log.warning("generation_priority_unchanged", error=str(exc))


class TransformersBackend(Backend):
    kind = "transformers"

    def __init__(self, settings) -> None:
        super().__init__()
        self.settings = settings
        self.reference = str(settings.base_model)  # a folder or a Hub id (flywheel.basemodel)
        self.device = settings.resolved_device()
        self.max_new_tokens = settings.max_new_tokens
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="generate",
                                        initializer=_generation_thread,
                                        initargs=(settings.generation_nice, settings.generation_threads))
        self._admin_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapters")
        self.tokenizer = None
        self.model = None  # the base model, or the PeftModel wrapping it once an adapter is loaded
        self.adapters: set[str] = set()
        self.context_len = 2048

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._admin_pool, self._load_base)
        except Exception as exc:  # keep serving /healthz and say why in /readyz
            self.error = f"could not load base model {self.reference}: {exc}"
            log.error("base_model_load_failed", model=self.reference, error=str(exc))
            raise
        self.ready, self.error = True, None

    def _load_base(self) -> None:
        started = time.perf_counter()
        self.tokenizer = load_tokenizer(self.reference)
        model = load_causal_lm(self.reference, self.device, self.settings.quantize)
        self.model = model.eval()
        self.context_len = int(getattr(model.config, "max_position_embeddings", None) or 2048)
        log.info("base_model_loaded", model=self.reference, device=self.device,
                 seconds=round(time.perf_counter() - started, 2), context_len=self.context_len)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._admin_pool.shutdown(wait=False, cancel_futures=True)

    # ---- adapters --------------------------------------------------------------------------
    async def load_adapter(self, name: str, path: Path) -> None:
        await asyncio.get_running_loop().run_in_executor(self._admin_pool, self._load_adapter, name, Path(path))

    def _load_adapter(self, name: str, path: Path) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self.adapters:
                return
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(path), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                    self.model.eval()
            except Exception as exc:
                self._forget(name)
                raise AdapterError(f"PEFT could not load adapter {name} from {path}: {exc}") from exc
            self.adapters.add(name)

    def _forget(self, name: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel) and name in self.model.peft_config:
            others = [a for a in self.model.peft_config if a != name]
            try:
                if others and self.model.active_adapter == name:
                    self.model.set_adapter(others[0])  # PEFT warns when the active one is deleted
                self.model.delete_adapter(name)
            except Exception as exc:  # noqa: BLE001 - a half-loaded adapter: log, it is never routed to
                log.warning("adapter_cleanup_failed", name=name, error=str(exc))

    async def unload_adapter(self, name: str) -> None:
        await asyncio.get_running_loop().run_in_executor(self._admin_pool, self._unload_adapter, name)

    def _unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self.adapters:
                self._forget(name)
                self.adapters.discard(name)

    # ---- requests --------------------------------------------------------------------------
    def _not_ready(self) -> str:
        return "the base model could not be loaded" if self.error else "the base model is still loading"

    def _prompt(self, endpoint: Endpoint, req: Request) -> str:
        if endpoint == "chat":
            try:
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                return render(self.tokenizer, messages)
            except ValueError as exc:
                raise bad_request(str(exc), param="messages") from exc
            except Exception as exc:
                raise bad_request(f"the chat template refused these messages: {exc}", param="messages") from exc
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1 or not isinstance(prompt[0], str):
                raise bad_request("this backend takes one text prompt per request", param="prompt")
            prompt = prompt[0]
        return prompt

    def _prepare(self, endpoint: Endpoint, req: Request, version: str | None):
        if not self.ready:
            raise unavailable(self._not_ready(), code="model_loading")
        if req.n != 1:
            raise bad_request("the transformers backend generates one choice per request (n=1)", param="n")
        if req.wants_logprobs():
            raise bad_request("the transformers backend does not return logprobs", param="logprobs")
        if version is not None and version not in self.adapters:
            raise unavailable(f"adapter {version} is not loaded on this replica", code="adapter_unavailable")
        text = self._prompt(endpoint, req)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=endpoint == "completions")
        n_prompt = int(ids["input_ids"].shape[1])
        if n_prompt == 0:
            raise bad_request("the prompt is empty", param="prompt")
        requested = req.token_limit()
        if n_prompt >= self.context_len or (requested and n_prompt + requested > self.context_len):
            raise bad_request(
                f"This model's maximum context length is {self.context_len} tokens. However, you requested "
                f"{n_prompt + (requested or 0)} tokens ({n_prompt} in the prompt, {requested or 0} for the "
                "completion). Please reduce the length of the prompt or of max_tokens.",
                code="context_length_exceeded", param="messages" if endpoint == "chat" else "prompt")
        max_new = min(requested or self.max_new_tokens, self.context_len - n_prompt)
        return text, ids, n_prompt, max_new

    async def _prepare_async(self, endpoint: Endpoint, req: Request, version: str | None):
        """Chat template + tokenization off the event loop (long prompts take milliseconds), on the
        default pool rather than the generation pool, whose threads may all be waiting for the lock."""
        if not self.ready:
            raise unavailable(self._not_ready(), code="model_loading")
        return await asyncio.get_running_loop().run_in_executor(None, self._prepare, endpoint, req, version)

    def _gen_kwargs(self, req: Request, ids, max_new: int, cancel: threading.Event, streamer=None) -> dict:
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return cancel.is_set()

        kwargs = dict(ids.to(self.device), max_new_tokens=max_new, pad_token_id=self.tokenizer.pad_token_id
                      or self.tokenizer.eos_token_id, eos_token_id=list(chat_format(self.tokenizer).stop_ids),
                      stopping_criteria=StoppingCriteriaList([_Cancel()]))
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=req.top_p or 1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.stop:
            kwargs.update(stop_strings=req.stop_list(), tokenizer=self.tokenizer)
        if streamer is not None:
            kwargs["streamer"] = streamer
        return kwargs

    def _run(self, version: str | None, req: Request, kwargs: dict, cancel: threading.Event | None = None):
        """Generate under the lock with the right adapter active; returns the new token ids.
        A request cancelled while it waited for the lock does not start."""
        import torch

        with self._lock:
            if cancel is not None and cancel.is_set():
                raise _Cancelled("the client left")
            if version is not None and version not in self.adapters:
                raise _Cancelled(f"adapter {version} was unloaded")
            model = self.model
            if version is not None:
                model.set_adapter(version)
                ctx = nullcontext()
            else:
                ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
            if req.seed is not None:
                torch.manual_seed(req.seed)
            with ctx, torch.inference_mode(), inference_autocast(self.device, self.settings.inference_bf16):
                out = model.generate(**kwargs)
        return out[0, kwargs["input_ids"].shape[1]:]

    def _finish(self, new_ids, max_new: int, stopped: bool) -> str:
        if stopped:
            return "stop"
        if len(new_ids) >= max_new and (len(new_ids) == 0
                                        or int(new_ids[-1]) not in chat_format(self.tokenizer).stop_ids):
            return "length"
        return "stop"

    async def generate(self, version: str | None, endpoint: Endpoint, req: Request) -> dict:
        text, ids, n_prompt, max_new = await self._prepare_async(endpoint, req, version)
        cancel = threading.Event()
        kwargs = self._gen_kwargs(req, ids, max_new, cancel)
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._run, version, req, kwargs, cancel)
        try:
            new_ids = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The client left: stop at the next token, and hold the caller's lease on the
            # version until the thread is out of the model.
            cancel.set()
            (done,) = await asyncio.gather(future, return_exceptions=True)
            if not isinstance(done, BaseException):
                self.on_discarded(len(done))
            raise
        except _Cancelled as exc:
            raise unavailable(str(exc), code="adapter_unavailable") from exc
        out = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        trimmer = StopTrimmer(req.stop_list())
        out = trimmer.feed(out) + trimmer.flush()
        finish = self._finish(new_ids, max_new, trimmer.stopped)
        if endpoint == "completions" and req.echo:
            out = text + out
        build = fmt.chat_completion if endpoint == "chat" else fmt.text_completion
        return build("", out, finish, n_prompt, len(new_ids))

    async def stream(self, version: str | None, endpoint: Endpoint, req: Request) -> AsyncIterator[dict]:
        text, ids, n_prompt, max_new = await self._prepare_async(endpoint, req, version)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        streamer = _QueueStreamer(self.tokenizer, loop, queue)
        kwargs = self._gen_kwargs(req, ids, max_new, cancel, streamer)

        def work():
            try:
                new_ids = self._run(version, req, kwargs, cancel)
                loop.call_soon_threadsafe(queue.put_nowait, ("done", new_ids))
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

        future = loop.run_in_executor(self._pool, work)
        cid, created = fmt.new_id("chatcmpl" if endpoint == "chat" else "cmpl"), int(time.time())
        chat = endpoint == "chat"
        trimmer = StopTrimmer(req.stop_list())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        try:
            if chat:
                yield fmt.chat_chunk(cid, created, "", {"role": "assistant", "content": ""})
            elif req.echo:
                yield fmt.text_chunk(cid, created, "", text)
            new_ids = None
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    piece = trimmer.feed(value)
                    if trimmer.stopped:
                        cancel.set()
                    if piece:
                        yield (fmt.chat_chunk(cid, created, "", {"content": piece}) if chat
                               else fmt.text_chunk(cid, created, "", piece))
                elif kind == "error":
                    if isinstance(value, _Cancelled):
                        raise unavailable(str(value), code="adapter_unavailable")
                    log.error("generation_failed", error=type(value).__name__)
                    raise GatewayError(500, "generation failed", type="server_error")
                else:
                    new_ids = value
                    break
            rest = trimmer.flush()
            if rest:
                yield (fmt.chat_chunk(cid, created, "", {"content": rest}) if chat
                       else fmt.text_chunk(cid, created, "", rest))
            finish = self._finish(new_ids, max_new, trimmer.stopped)
            yield (fmt.chat_chunk(cid, created, "", {}, finish) if chat
                   else fmt.text_chunk(cid, created, "", "", finish))
            if include_usage:
                yield fmt.usage_chunk(cid, created, "", "chat.completion.chunk" if chat else "text_completion",
                                      n_prompt, len(new_ids))
        finally:
            cancel.set()  # a client that went away stops the generation at the next token
            if not future.done():  # hold the caller's lease on the version until the thread is out
                await asyncio.shield(future)

    def status(self) -> dict:
        return {**super().status(), "model": self.reference, "device": self.device,
                "adapters": sorted(self.adapters)}


def _queue_streamer_class():
    from transformers import TextStreamer

    class QueueStreamer(TextStreamer):
        """TextStreamer that hands finished text pieces to an asyncio queue."""

        def __init__(self, tokenizer, loop, queue):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.loop, self.queue = loop, queue

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ("text", text))

    return QueueStreamer


def _QueueStreamer(tokenizer, loop, queue):
    return _queue_streamer_class()(tokenizer, loop, queue)
