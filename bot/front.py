"""The ack front: a lean process that answers Slack's HTTP requests for the bot, which runs in a
worker process behind it (`flywheel bot worker`, the app of bot/server.py on a Unix socket).

Why: an ack sent from the bot's own event loop shares the GIL, and the garbage collector's full
collections of a big heap (Bolt, SQLAlchemy, transformers), with the threads that handle events;
under a burst of events its p99 was 120-300 ms against 7-12 ms for a bare app. This process
imports none of that (no Bolt, torch, transformers, sqlmodel or numpy) and does little per
request: the size and signature checks of bot/slack_http.py on the raw bytes, then

- Events API deliveries (`event_callback`): 200 at once, and the body with Slack's headers handed
  to the worker in the background by a few forwarder tasks from a bounded queue (each kept and
  retried until the worker has taken it; lost, logged and counted, only if the worker exits or the
  front stops first). When the queue
  is full (the worker falls behind) or the worker is down, the event is refused with 503 instead,
  so Slack delivers it again: an event is acked only when it can be handed on.
- everything else (interactivity, slash commands, url_verification): passed to the worker and
  its answer relayed (status, body, content type), since Slack reads Bolt's response body.

`/healthz` is 200 only while the worker's own /healthz answers over the socket; `/metrics` is
this process's request metrics followed by the worker's (the worker's copies of the families
this process owns are left out). The worker re-checks signatures: harmless, and only the owner
can reach its socket (a private 0700 directory).

`flywheel bot serve` (HTTP mode, FLYWHEEL_BOT_ACK_PROCESS on) becomes this process
(`python -m bot.front`), which starts the worker, waits until it is healthy, serves, and on
SIGTERM or SIGINT stops the worker and removes the socket directory. If the worker dies later,
the front logs it and answers 503 (events and /healthz) until it is restarted."""
from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import Protocol

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from slack_sdk.signature import SignatureVerifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot import metrics
from bot.settings import BotSettings
from bot.slack_http import EVENTS_PATH, _kind, verified_body
from flywheel.logs import describe_exception, get_logger

log = get_logger("bot.front")

WORKER_URL = "http://bot-worker"  # the host is a formality: the connection is the Unix socket
# What the worker needs of a request: Bolt checks the signature again and reads Slack's retries.
FORWARDED_HEADERS = ("content-type", "x-slack-signature", "x-slack-request-timestamp",
                     "x-slack-retry-num", "x-slack-retry-reason")
FORWARDERS = 8  # events handed to the worker at once
CONNECTIONS = 32  # to the worker, all requests together
FORWARD_TIMEOUT_S = 30.0
FORWARD_ATTEMPTS = 3  # failed hand-offs of one event before new events get 503 until the worker answers
FORWARD_BACKOFF_MAX_S = 2.0  # between hand-offs of an acked event the worker has not taken yet
HEALTH_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 10.0  # at shutdown, for acked events still to be handed on
WORKER_START_TIMEOUT_S = 180.0
WORKER_STOP_TIMEOUT_S = 20.0
WORKER_STOP_MARGIN_S = 5.0  # past the worker's answer drain (FLYWHEEL_ANSWER_DRAIN_S)


class Worker(Protocol):
    """What the front needs of its worker: where it listens and whether it still runs."""

    uds: str
    pid: int | None

    def alive(self) -> bool: ...


def create_front(settings: BotSettings, worker: Worker, *, forwarders: int = FORWARDERS) -> Starlette:
    """The front as an ASGI app for uvicorn: /slack/events, /healthz and /metrics."""
    link = WorkerLink(worker)
    forwarder = Forwarder(link, settings.bot_ack_queue)
    registry = CollectorRegistry()
    for collector in (metrics.REQUESTS, metrics.REJECTED, metrics.FORWARDS, metrics.FORWARD_QUEUE):
        registry.register(collector)
    routes = [Route("/healthz", health_endpoint(link)), Route("/metrics", metrics_endpoint(link, registry)),
              Route(EVENTS_PATH, events_endpoint(settings, link, forwarder), methods=["POST"])]
    asgi = Starlette(routes=routes, lifespan=make_lifespan(link, forwarder, forwarders))
    asgi.state.queue, asgi.state.worker = forwarder.queue, worker
    return asgi


class WorkerLink:
    """The front's side of its worker: the client session over the Unix socket (made in the
    server's event loop), whether the worker process runs, and whether its socket answers."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.session: aiohttp.ClientSession | None = None
        self._mourned = False
        # Set when an acked event could not reach a worker whose process runs (its socket gone, say):
        # events are refused until a hand-off or a health check gets through again.
        self.unreachable = asyncio.Event()

    def open(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.worker.uds, limit=CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S))

    async def close(self) -> None:
        session, self.session = self.session, None
        await session.close()

    def up(self) -> bool:
        """Whether the worker runs; its death is logged once, by whichever request sees it first."""
        if self.worker.alive():
            return True
        if not self._mourned:
            self._mourned = True
            log.error("the bot worker exited: events and /healthz get 503 until the bot is restarted",
                      pid=self.worker.pid, returncode=getattr(self.worker, "returncode", None))
        return False

    async def watch(self) -> None:
        """Notice the worker's death without a request, and its socket answering again."""
        while self.up():
            await asyncio.sleep(1.0)
            if self.unreachable.is_set() and (await self.health())[0]:
                self.unreachable.clear()
                log.info("the bot worker is reachable again")

    async def health(self) -> tuple[bool, str]:
        try:
            async with self.session.get(f"{WORKER_URL}/healthz",
                                        timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as resp:
                await resp.read()
                return resp.status == 200, f"worker answered {resp.status}"
        except TimeoutError:
            return False, "worker did not answer in time"
        except aiohttp.ClientError:
            return False, "worker unreachable"

    async def metrics(self) -> bytes:
        """The worker's metrics (Prometheus text format); empty if it does not give them."""
        try:
            async with self.session.get(f"{WORKER_URL}/metrics",
                                        timeout=aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)) as resp:
                if resp.status == 200:
                    return await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("cannot read the bot worker's metrics", error=describe_exception(exc))
        return b""

    async def relay(self, kind: str, target: str, body: bytes, passed: dict) -> Response:
        """A request whose answer Slack reads: the worker's status, body and content type."""
        if not self.up():
            log.warning("request refused: the bot worker is down", kind=kind, status=503)
            return JSONResponse({"error": "worker down"}, status_code=503)
        try:
            async with self.session.post(WORKER_URL + target, data=body, headers=passed) as resp:
                content = await resp.read()
                status, content_type = resp.status, resp.headers.get("content-type")
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.error("the bot worker did not answer", kind=kind, error=describe_exception(exc))
            return JSONResponse({"error": "worker unavailable"}, status_code=503)
        return Response(content=content, status_code=status,
                        headers={"content-type": content_type} if content_type else None)


class Forwarder:
    """Acked events handed to the worker in the background by a few tasks from a bounded queue."""

    def __init__(self, link: WorkerLink, size: int) -> None:
        self.link = link
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=size)
        metrics.FORWARD_QUEUE.set_function(self.queue.qsize)

    def offer(self, target: str, body: bytes, passed: dict) -> str | None:
        """Queue an event to be acked, or say why it must be refused (for Slack to retry)."""
        if not self.link.up():
            return "worker down"
        if self.link.unreachable.is_set():
            return "worker unreachable"
        try:
            self.queue.put_nowait((target, body, passed))
        except asyncio.QueueFull:
            return "busy"
        return None

    def start(self, count: int) -> list[asyncio.Task]:
        return [asyncio.create_task(self.forward(), name=f"forward-{i}") for i in range(count)]

    async def forward(self) -> None:
        while True:
            target, body, passed = await self.queue.get()
            try:
                await self.hand_on(target, body, passed)
            except asyncio.CancelledError:  # the front stops with this event not yet taken
                metrics.FORWARDS.labels("failed").inc()
                log.error("acked event lost: the front stopped before the worker took it")
                raise
            except Exception as exc:  # noqa: BLE001 - a bug must not stop the forwarder
                metrics.FORWARDS.labels("failed").inc()
                log.error("acked event lost", error=describe_exception(exc))
            finally:
                self.queue.task_done()

    async def hand_on(self, target: str, body: bytes, passed: dict) -> None:
        """One acked event to the worker, kept until the worker has taken it: a failed connection,
        a timeout or a 5xx is tried again, backing off, for as long as the worker process runs
        (the bot drops a delivery it already has by its event id). Lost (logged, counted) only when
        the worker is gone for good, or when the front stops first (see `drain`)."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self.link.session.post(WORKER_URL + target, data=body, headers=passed) as resp:
                    await resp.read()
                    self.link.unreachable.clear()
                    if resp.status < 500:
                        _count_delivered(resp.status)
                        return
                    reason = f"status {resp.status}"
            except TimeoutError:
                reason = f"no answer in {FORWARD_TIMEOUT_S:.0f} s"
            except aiohttp.ClientConnectionError as exc:
                reason = describe_exception(exc)
            if not self.link.up():
                metrics.FORWARDS.labels("failed").inc()
                log.error("acked event lost: the bot worker exited", attempts=attempt, reason=reason)
                return
            if attempt == FORWARD_ATTEMPTS:  # more than a blip: new events get 503 meanwhile
                self.link.unreachable.set()
                log.error("the bot worker cannot take an acked event; kept and retried", reason=reason)
            await asyncio.sleep(min(FORWARD_BACKOFF_MAX_S, 0.2 * attempt))

    async def drain(self) -> None:
        """At shutdown, once the server stopped taking requests: hand on what was acked, for up to
        DRAIN_TIMEOUT_S; what is still queued then is lost (counted)."""
        try:
            await asyncio.wait_for(self.queue.join(), DRAIN_TIMEOUT_S)
        except TimeoutError:
            if self.queue.qsize():  # those being handed on count themselves when cancelled
                metrics.FORWARDS.labels("failed").inc(self.queue.qsize())
                log.error("acked events lost: not handed to the bot worker at shutdown", count=self.queue.qsize())


def _count_delivered(status: int) -> None:
    if status < 300:
        metrics.FORWARDS.labels("ok").inc()
    else:  # the worker read it and said no (it checks the signature again): retrying will not help
        metrics.FORWARDS.labels("failed").inc()
        log.error("acked event refused by the bot worker", status=status)


def _refuse(reason: str) -> Response:
    metrics.FORWARDS.labels(reason).inc()
    log.warning("event refused for Slack to retry", reason=reason, status=503)
    return JSONResponse({"error": reason}, status_code=503)


def events_endpoint(settings: BotSettings, link: WorkerLink, forwarder: Forwarder):
    """/slack/events: checked, then an event acked and queued (or refused), anything else relayed."""
    verifier = SignatureVerifier(settings.slack_signing_secret)
    limit = settings.max_body_bytes

    async def slack_events(request: Request) -> Response:
        started = time.perf_counter()
        headers = request.headers
        body = await verified_body(request, verifier, limit)
        if isinstance(body, Response):
            return body
        kind = _kind(body, headers.get("content-type", ""))
        passed = {name: value for name in FORWARDED_HEADERS if (value := headers.get(name)) is not None}
        query = request.scope.get("query_string") or b""
        target = f"{EVENTS_PATH}?{query.decode('latin-1')}" if query else EVENTS_PATH
        if kind == "event" and b'"event_callback"' in body:
            reason = forwarder.offer(target, body, passed)
            if reason is not None:
                return _refuse(reason)
            metrics.REQUESTS.labels(kind).observe(time.perf_counter() - started)
            return Response(status_code=200)
        response = await link.relay(kind, target, body, passed)
        metrics.REQUESTS.labels(kind).observe(time.perf_counter() - started)
        return response

    return slack_events


def health_endpoint(link: WorkerLink):
    """/healthz: 200 only while the worker runs and its own /healthz answers."""
    async def healthz(_request: Request) -> Response:
        pid = link.worker.pid
        if not link.up():
            return JSONResponse({"ok": False, "reason": "worker exited", "worker_pid": pid}, status_code=503)
        ok, reason = await link.health()
        if ok:
            return JSONResponse({"ok": True, "mode": "http", "worker_pid": pid})
        return JSONResponse({"ok": False, "reason": reason, "worker_pid": pid}, status_code=503)

    return healthz


def metrics_endpoint(link: WorkerLink, registry: CollectorRegistry):
    """/metrics: this process's request metrics, then the worker's."""
    async def prometheus(_request: Request) -> Response:
        own = generate_latest(registry)
        theirs = await link.metrics() if link.up() else b""
        return Response(merge_exposition(own, theirs), media_type=CONTENT_TYPE_LATEST)

    return prometheus


def make_lifespan(link: WorkerLink, forwarder: Forwarder, forwarders: int):
    """The session and the forwarder and watch tasks for the server's lifetime; at shutdown the
    acked events are handed on first."""
    @asynccontextmanager
    async def lifespan(_app):
        link.open()
        tasks = forwarder.start(forwarders)
        tasks.append(asyncio.create_task(link.watch(), name="watch-worker"))
        try:
            yield
        finally:
            await forwarder.drain()  # the server stopped taking requests
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await link.close()

    return lifespan


def merge_exposition(own: bytes, other: bytes) -> bytes:
    """`own` metrics (Prometheus text format), then those families of `other` that `own` lacks: a
    family may appear once per scrape."""
    names = {line.split(maxsplit=3)[2] for line in own.splitlines() if line.startswith(b"# HELP ")}
    out, keep = [own], True
    for line in other.splitlines(keepends=True):
        if line.startswith(b"# HELP "):
            keep = line.split(maxsplit=3)[2] not in names
        if keep:
            out.append(line)
    return b"".join(out)


# -- the worker process ---------------------------------------------------------------------------
class WorkerStartError(RuntimeError):
    """The worker exited or was not healthy in time during start-up; the message ends with the
    last lines it wrote to stderr."""


def worker_healthy(uds: str, timeout_s: float = 2.0) -> bool:
    """Whether the worker's /healthz answers 200 over its socket (blocking; for start-up)."""
    import httpx  # only at start-up: the serving path uses aiohttp

    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=uds), timeout=timeout_s) as client:
            return client.get("http://bot-worker/healthz").status_code == 200
    except httpx.HTTPError:
        return False


class WorkerProcess:
    """`flywheel bot worker` as a child process (same python, same environment) listening on a
    Unix socket in a private directory made here. Its stderr is copied to ours line by line (the
    last lines are kept for a start-up error); it runs in a session of its own (a Ctrl-C reaches
    the front, which stops it in order) and holds the read end of a pipe whose write end only
    this process has: when this process ends, however it ends, the worker sees the pipe close and
    stops too."""

    def __init__(self, command: list[str] | None = None) -> None:
        self.command = command or [sys.executable, "-m", "flywheel", "bot", "worker"]
        self.dir = tempfile.mkdtemp(prefix="flywheel-bot-")  # mode 0700: only this user gets in
        self.uds = os.path.join(self.dir, "worker.sock")
        self.proc: subprocess.Popen | None = None
        self._lifeline: int | None = None
        self._relay: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=30)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        return "".join(self._tail).rstrip() or "(nothing)"

    def start(self, timeout_s: float = WORKER_START_TIMEOUT_S) -> WorkerProcess:
        """Start the worker and wait until its /healthz answers."""
        read_end, self._lifeline = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [*self.command, "--uds", self.uds, "--lifeline-fd", str(read_end)],
                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(read_end,), start_new_session=True)
        finally:
            os.close(read_end)
        self._relay = threading.Thread(target=self._copy_stderr, args=(self.proc.stderr,),
                                       name="bot-worker-stderr", daemon=True)
        self._relay.start()
        deadline = time.monotonic() + timeout_s
        while not worker_healthy(self.uds):
            if self.proc.poll() is not None:
                self._relay.join(5)
                raise WorkerStartError(f"the bot worker exited with code {self.proc.returncode} during "
                                       f"start-up; its last lines:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise WorkerStartError(f"the bot worker was not healthy after {timeout_s:.0f} s; its last "
                                       f"lines:\n{self.tail()}")
            time.sleep(0.1)
        log.info("bot worker ready", pid=self.proc.pid)
        return self

    def _copy_stderr(self, stream) -> None:
        for line in iter(stream.readline, b""):
            self._tail.append(line.decode("utf-8", "replace"))
            try:
                os.write(2, line)
            except OSError:
                pass
        stream.close()

    def stop(self, timeout_s: float = WORKER_STOP_TIMEOUT_S) -> None:
        """SIGTERM (the worker finishes what it dispatched), then SIGKILL after `timeout_s`; then
        the socket directory goes. Safe to call twice."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the bot worker did not stop in time; killing it", pid=proc.pid, timeout_s=timeout_s)
                proc.kill()
                proc.wait()
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._relay is not None:
            self._relay.join(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the process ----------------------------------------------------------------------------------
class _Stop(Exception):
    """SIGTERM or SIGINT: stop serving, then stop the worker."""


def _stop(signum, _frame) -> None:
    raise _Stop(signum)


def serve(settings: BotSettings, host: str, port: int, worker: WorkerProcess, *, fd: int | None = None) -> int:
    """Start the worker, serve the front until SIGTERM or SIGINT, stop the worker; the exit code.
    uvicorn stops gracefully on the signal, then raises it again for the handler here."""
    import uvicorn

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        try:
            worker.start()
        except WorkerStartError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        asgi = create_front(settings, worker)
        gc.collect()
        gc.freeze()  # what start-up made lives on: keep it out of the full collections
        uvicorn.run(asgi, host=host, port=port, fd=fd, log_level="warning")
        return 0
    except _Stop:
        return 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # stopping already: a second signal must not cut it short
        worker.stop(settings.answer_drain_s + WORKER_STOP_MARGIN_S)  # its answers drain first


def main(argv: list[str] | None = None) -> int:
    """`python -m bot.front --host H --port P [--fd N]`: what `flywheel bot serve` becomes in HTTP mode."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bot.front",
                                     description="The bot's ack front; the bot itself runs in a worker behind it.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--fd", type=int, default=None, help="an inherited, already-bound socket instead")
    args = parser.parse_args(argv)
    try:
        settings = BotSettings()
        settings.require_http_credentials()
    except ValueError as exc:  # pydantic's ValidationError too
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return serve(settings, args.host, args.port, WorkerProcess(), fd=args.fd)


if __name__ == "__main__":
    sys.exit(main())
