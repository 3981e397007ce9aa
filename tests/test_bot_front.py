"""The ack front (bot/front.py): `flywheel bot serve` in HTTP mode as it runs in production, a lean
process that checks and acks Slack's requests and a worker process (the Bolt app) behind it on a
Unix socket. Real processes throughout: `flywheel bot serve` started as a command, the local
Slack double, a migrated SQLite store, and signed requests over real HTTP. No gateway: the bot's
answers are apologies (the gateway's port refuses), which is enough to see an event handled.

The back-pressure test runs the front in this process against a small real worker double on a
Unix socket that holds every request until it is told to answer."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flywheel.app.demo.slack_double import BOT_USER_ID, SlackDouble, SlackSender
from store.migrate import upgrade
from tests.support.net import listening_socket, port_of, refusing_socket
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
SECRET = "front-signing-secret-0123456789abcdef"
MAX_BODY = 65536
HEAVY = ("torch", "transformers", "slack_bolt", "sqlmodel", "sqlalchemy", "numpy")

pytestmark = pytest.mark.skipif(not hasattr(__import__("socket"), "AF_UNIX"), reason="needs Unix sockets")


class BotServe:
    """`flywheel bot serve` as a child process on a socket bound here, its temporary files (the
    front's socket directory among them) under `tmp`, its output in `tmp/bot.log`."""

    def __init__(self, tmp: Path, double: SlackDouble, db_url: str, **env) -> None:
        self.tmp, self.sock = tmp, listening_socket()  # port 0, handed over (--fd): no race for a port
        self.url = f"http://127.0.0.1:{port_of(self.sock)}"
        self.gateway = refusing_socket()  # a gateway that is down: answers become apologies at once
        full = {**os.environ, "SLACK_BOT_TOKEN": double.bot_token, "SLACK_SIGNING_SECRET": SECRET,
                "SLACK_API_URL": double.api_url, "FLYWHEEL_DATABASE_URL": db_url,
                "FLYWHEEL_GATEWAY_URL": f"http://127.0.0.1:{port_of(self.gateway)}",
                "FLYWHEEL_GATEWAY_CONNECT_RETRY_S": "0", "FLYWHEEL_REPORTS_ENABLED": "false",
                "FLYWHEEL_MEMORY": "0", "FLYWHEEL_MAX_BODY_BYTES": str(MAX_BODY), "FLYWHEEL_SLACK_RETRIES": "0",
                "TMPDIR": str(tmp), **env}
        full.pop("SLACK_APP_TOKEN", None)
        self.log = tmp / "bot.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flywheel", "bot", "serve", "--fd", str(self.sock.fileno())],
                cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT, pass_fds=(self.sock.fileno(),))
        self.sender = SlackSender(f"{self.url}/slack/events", SECRET, double=double)

    def start(self, timeout: float = 120.0) -> BotServe:
        def healthy():
            if self.proc.poll() is not None:
                raise AssertionError(f"bot serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                answer = httpx.get(f"{self.url}/healthz", timeout=5)
            except httpx.TransportError:
                return None
            return answer.json() if answer.status_code == 200 else None
        self.health = wait_until(healthy, timeout, "bot serve to be healthy")
        return self

    @property
    def worker_pid(self) -> int:
        return self.health["worker_pid"]

    def socket_dirs(self) -> list[Path]:
        return sorted(self.tmp.glob("flywheel-bot-*"))

    def worker(self) -> httpx.Client:
        """A client straight to the worker's socket, past the front (the test's own view)."""
        (sock,) = [d / "worker.sock" for d in self.socket_dirs()]
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://worker", timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.sender.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        finally:
            self.gateway.close()
            self.sock.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) has stopped all the same
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(text: str, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples(text).items() if n == name and want <= set(lab))


@pytest.fixture(scope="module")
def double():
    with SlackDouble() as slack:
        yield slack


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('front-db') / 'flywheel.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def bot(tmp_path_factory, double, db):
    """One `flywheel bot serve` (front + worker) for the tests that leave it running."""
    server = BotServe(tmp_path_factory.mktemp("front"), double, db).start()
    yield server
    server.stop()


@pytest.fixture
def own_bot(tmp_path, double, db):
    """A `flywheel bot serve` of the test's own, to kill or stop."""
    server = BotServe(tmp_path, double, db).start()
    yield server
    if server.proc.poll() is None:
        server.stop()


# -- (a) an event: acked by the front, handled by the worker ---------------------------------------
def test_an_event_is_acked_by_the_front_and_handled_by_the_worker(bot, double):
    assert bot.health["ok"] and alive(bot.worker_pid) and bot.worker_pid != bot.proc.pid
    if Path("/proc").is_dir():  # `bot serve` became the lean front (same pid), not the CLI with its imports
        assert b"bot.front" in Path(f"/proc/{bot.proc.pid}/cmdline").read_bytes()
    sender = bot.sender
    ts = sender.next_ts()
    body = sender.event_body({"type": "app_mention", "user": "UALICE01", "channel": "CFRONT001", "ts": ts,
                              "event_ts": ts, "text": f"<@{BOT_USER_ID}> is the front in the way?"})
    acked = sender.post_raw(body)
    assert acked.status_code == 200 and acked.content == b""
    # the worker got it: the bot answered in the channel (an apology: there is no gateway) ...
    double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == "CFRONT001")
    # ... and got it whole, Slack's retry headers too: a redelivery of the same event is dropped there
    retried = sender.post_raw(body, extra={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    assert retried.status_code == 200
    with bot.worker() as worker:
        wait_until(lambda: total(worker.get("/metrics").text, "flywheel_bot_duplicate_events_total") >= 1,
                   what="the redelivery dropped by the worker")
    assert len([c for c in double.calls_to("chat.postMessage") if c.args.get("channel") == "CFRONT001"]) == 1

    # /metrics: the front's ack times and forwards, then the worker's families, each family once
    served = httpx.get(f"{bot.url}/metrics", timeout=10).text
    helps = [line.split()[2] for line in served.splitlines() if line.startswith("# HELP ")]
    assert len(helps) == len(set(helps))
    assert total(served, "flywheel_bot_request_seconds_count", kind="event") >= 2
    assert total(served, "flywheel_bot_forwards_total", outcome="ok") >= 2
    assert total(served, "flywheel_bot_events_total") >= 2  # counted by the worker
    assert total(served, "flywheel_bot_duplicate_events_total") >= 1


# -- (b) refused at the front, never seen by the worker --------------------------------------------
def test_forged_stale_and_oversized_requests_are_refused_by_the_front_alone(bot, double):
    def worker_requests() -> float:
        with bot.worker() as worker:
            text = worker.get("/metrics").text
        return (total(text, "flywheel_bot_request_seconds_count")
                + total(text, "flywheel_bot_rejected_requests_total"))

    before = worker_requests()
    forged = bot.sender.mention("forged", channel="CFORGED01", secret="not-the-secret")[1]
    stale = bot.sender.mention("replayed", channel="CSTALE001", timestamp=int(time.time()) - 600)[1]
    big = bot.sender.event_body({"type": "app_mention", "user": "UALICE01", "text": "x" * MAX_BODY,
                                 "channel": "CBIG00001", "ts": bot.sender.next_ts()})
    oversized = bot.sender.post_raw(big)
    unsigned = httpx.post(bot.sender.url, content=b"payload=%7Bnot-json",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert (forged.status_code, forged.json()) == (401, {"error": "bad signature"})
    assert (stale.status_code, stale.json()) == (401, {"error": "stale timestamp"})
    assert (oversized.status_code, oversized.json()) == (413, {"error": "too large"})
    assert (unsigned.status_code, unsigned.json()) == (401, {"error": "unsigned"})
    served = httpx.get(f"{bot.url}/metrics", timeout=10).text
    for reason in ("bad signature", "stale timestamp", "too large", "unsigned"):
        assert total(served, "flywheel_bot_rejected_requests_total", reason=reason) >= 1, reason
    assert worker_requests() == before
    assert not [c for c in double.calls if c.args.get("channel") in ("CFORGED01", "CSTALE001", "CBIG00001")]
    assert "request rejected" in bot.output() and "forged" not in bot.output()


# -- (c) answers Slack reads come from the worker --------------------------------------------------
def test_commands_and_interactions_get_the_workers_answer_through_the_front(bot, double):
    challenge = bot.sender.post_raw(json.dumps({"token": "unused", "type": "url_verification",
                                                "challenge": "front-challenge-42"}))
    assert challenge.status_code == 200 and "front-challenge-42" in challenge.text

    empty = bot.sender.view_submission(  # the modal stays open with the worker's reason
        callback_id="correction_modal", private_metadata=json.dumps({"channel": "CFRONT001", "ts": "1.2"}),
        values={"correction": {"text": {"type": "plain_text_input", "value": ""}}})
    assert empty.status_code == 200 and empty.headers["content-type"].startswith("application/json")
    assert empty.json() == {"response_action": "errors",
                            "errors": {"correction": "Please write the better answer."}}

    command = bot.sender.command("help", channel="CFRONT002")
    assert command.status_code == 200
    rid = bot.sender.last_response_id
    said = double.wait_for("response", lambda c: c.args["response_id"] == rid)[0].args
    assert "help" in said["text"]


# -- (d) a dead worker: 503 for Slack to retry, and an unhealthy front ----------------------------
def test_with_the_worker_dead_events_and_health_get_503(own_bot):
    os.kill(own_bot.worker_pid, signal.SIGKILL)
    health = wait_until(lambda: (r := httpx.get(f"{own_bot.url}/healthz", timeout=10)).status_code == 503 and r,
                        what="the front's /healthz to turn 503")
    assert health.json()["reason"] == "worker exited"
    event = own_bot.sender.mention("anyone there?", channel="CDEAD0001")[1]
    assert (event.status_code, event.json()) == (503, {"error": "worker down"})
    assert own_bot.sender.command("help").status_code == 503
    served = httpx.get(f"{own_bot.url}/metrics", timeout=10).text
    assert total(served, "flywheel_bot_forwards_total", outcome="worker down") >= 1
    assert own_bot.stop() == 0
    assert "the bot worker exited" in own_bot.output()
    assert own_bot.socket_dirs() == []


# -- (e) stopping `bot serve` stops its worker -----------------------------------------------------
def test_sigterm_stops_the_worker_and_removes_the_socket_directory(own_bot):
    (sock_dir,) = own_bot.socket_dirs()
    assert (sock_dir.stat().st_mode & 0o777) == 0o700
    worker = own_bot.worker_pid
    own_bot.proc.send_signal(signal.SIGTERM)
    assert own_bot.proc.wait(60) == 0
    assert not alive(worker), "the worker outlived bot serve"
    assert own_bot.socket_dirs() == []


def test_the_worker_stops_when_the_front_is_killed(own_bot):
    """However the front ends (here SIGKILL: no clean-up of its own), its worker does not linger."""
    worker = own_bot.worker_pid
    own_bot.proc.kill()
    own_bot.proc.wait(30)
    wait_until(lambda: not alive(worker), 60, "the worker to stop after its front died")
    assert own_bot.socket_dirs() == []  # the worker removed it


def test_a_worker_failing_at_start_up_is_reported_with_its_last_words(tmp_path, double, db):
    """The worker cannot reach Slack (auth.test) and exits: `bot serve` says so, quoting it, and
    leaves nothing behind."""
    with refusing_socket() as slack_down:
        server = BotServe(tmp_path, double, db, SLACK_API_URL=f"http://127.0.0.1:{port_of(slack_down)}/api/")
        assert server.proc.wait(120) == 1
    out = server.output()
    assert "error: the bot worker exited with code" in out and "Connection refused" in out.split("error:")[-1]
    assert server.socket_dirs() == []
    server.stop()


# -- (f) the front stays lean ----------------------------------------------------------------------
def test_the_front_imports_no_bolt_torch_or_database():
    code = ("import sys, json, bot.front, uvicorn, aiohttp\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True)
    assert json.loads(run.stdout) == []


def test_one_process_when_the_ack_process_is_off(tmp_path, double, db):
    server = BotServe(tmp_path, double, db, FLYWHEEL_BOT_ACK_PROCESS="0").start()
    try:
        assert "worker_pid" not in server.health and server.socket_dirs() == []
        assert server.sender.mention("one process", channel="CONE00001")[1].status_code == 200
        double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == "CONE00001")
    finally:
        server.stop()


# -- back-pressure: acked only what can be handed on -----------------------------------------------
class HeldWorker:
    """A real HTTP server on a Unix socket standing in for the worker: /healthz answers, and every
    /slack/events request is held until `release()`; it records the event ids it received. The
    front's `alive()` check asks it, and it says yes even once stopped (a process that runs but
    does not answer)."""

    def __init__(self, path: str, received: list | None = None) -> None:
        import uvicorn
        from starlette.applications import Starlette
        from starlette.responses import Response
        from starlette.routing import Route

        self.uds, self.pid = path, os.getpid()
        self.received = [] if received is None else received
        self.gate = threading.Event()

        async def events(request):
            import anyio.to_thread

            body = await request.body()
            await anyio.to_thread.run_sync(self.gate.wait, 60)
            self.received.append(json.loads(body)["event_id"])
            return Response(status_code=200)

        async def healthz(_request):
            return Response(b'{"ok": true}', media_type="application/json")

        app = Starlette(routes=[Route("/slack/events", events, methods=["POST"]), Route("/healthz", healthz)])
        self.server = uvicorn.Server(uvicorn.Config(app, uds=path, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        from bot.front import worker_healthy

        self.thread.start()
        wait_until(lambda: worker_healthy(self.uds), what="the worker double")
        return self

    def __exit__(self, *_exc) -> None:
        self.release()
        self.server.should_exit = True
        self.thread.join(30)
        if os.path.exists(self.uds):
            os.unlink(self.uds)

    def alive(self) -> bool:
        return True

    def release(self) -> None:
        self.gate.set()


@contextmanager
def front_before(worker, **settings):
    """The front in this process (uvicorn on a loopback port) before `worker`; yields a sender."""
    import uvicorn

    from bot.front import create_front
    from bot.settings import BotSettings

    forwarders = settings.pop("forwarders", 2)
    front = create_front(BotSettings(slack_bot_token="xoxb-x", slack_signing_secret=SECRET, **settings), worker,
                         forwarders=forwarders)
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(front, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    sender = SlackSender(f"http://127.0.0.1:{port_of(sock)}/slack/events", SECRET)
    try:
        wait_until(lambda: server.started, what="the front")
        yield sender
    finally:
        worker.release()
        sender.close()
        server.should_exit = True
        thread.join(30)
        sock.close()


def mention(sender: SlackSender, event_id: str) -> httpx.Response:
    return sender.event({"type": "app_mention", "user": "U1", "text": "hi", "channel": "C1", "ts": sender.next_ts()},
                        event_id=event_id)


def test_a_worker_that_falls_behind_gets_events_refused_not_lost(tmp_path):
    with HeldWorker(str(tmp_path / "worker.sock")) as worker, front_before(worker, bot_ack_queue=3) as sender:
        answers = {f"EvHELD{i:010d}": None for i in range(10)}
        for event_id in answers:
            answers[event_id] = mention(sender, event_id)
        acked = [e for e, r in answers.items() if r.status_code == 200]
        refused = [e for e, r in answers.items() if r.status_code == 503]
        assert len(acked) + len(refused) == 10
        # 2 forwarders held by the worker, 3 waiting in the queue: the rest refused for Slack to retry
        assert 3 <= len(acked) <= 5 and all(answers[e].json() == {"error": "busy"} for e in refused)
        worker.release()
        wait_until(lambda: sorted(worker.received) == sorted(acked), what="every acked event at the worker")
        assert not set(worker.received) & set(refused)
        assert mention(sender, "EvHELDAFTER0001").status_code == 200  # room again once the worker caught up
        wait_until(lambda: "EvHELDAFTER0001" in worker.received, what="the later event at the worker")


def failed_forwards() -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("flywheel_bot_forwards_total", {"outcome": "failed"}) or 0.0


def test_a_worker_out_of_reach_gets_events_refused_until_it_answers_again(tmp_path):
    """The worker's process runs but its socket does not answer: the event that finds out was
    acked, so it is kept and handed on again until the worker takes it (issue 25.5: not lost);
    the next ones get 503 until the socket answers again."""
    path = str(tmp_path / "worker.sock")
    worker = HeldWorker(path).__enter__()
    worker.release()
    with front_before(worker) as sender:
        assert mention(sender, "EvREACH000000001").status_code == 200
        wait_until(lambda: "EvREACH000000001" in worker.received, what="the first event at the worker")
        worker.__exit__()  # its server stops (connections closed, socket removed); `alive()` stays true
        before = failed_forwards()
        sent: dict[str, httpx.Response] = {}

        def refused_yet():  # events acked until the front knows; each one kept
            event_id = f"EvREACH2{len(sent):08d}"
            sent[event_id] = mention(sender, event_id)
            return sent[event_id].status_code == 503 and sent[event_id]

        refused = wait_until(refused_yet, what="events refused while the worker is out of reach")
        assert refused.json() == {"error": "worker unreachable"}
        acked = [e for e, r in sent.items() if r.status_code == 200]
        assert acked and all(r.status_code in (200, 503) for r in sent.values())
        health = httpx.get(sender.url.replace("/slack/events", "/healthz"), timeout=10)
        assert (health.status_code, health.json()["reason"]) == (503, "worker unreachable")

        worker = HeldWorker(path, received=worker.received).__enter__()  # back on the same socket
        worker.release()
        wait_until(lambda: set(acked) <= set(worker.received), what="the kept events at the worker")
        wait_until(lambda: mention(sender, "EvREACH000000004").status_code == 200, what="events acked again")
        wait_until(lambda: "EvREACH000000004" in worker.received, what="the event at the worker again")
        refused_ids = {e for e, r in sent.items() if r.status_code == 503}
        assert not refused_ids & set(worker.received) and failed_forwards() == before
    worker.__exit__()


class ExitingWorker(HeldWorker):
    """A worker whose process can be made to exit (`gone`)."""

    gone = False

    def alive(self) -> bool:
        return not self.gone


def test_an_acked_event_is_lost_logged_and_counted_only_when_the_worker_is_gone(tmp_path):
    worker = ExitingWorker(str(tmp_path / "worker.sock")).__enter__()
    worker.release()
    with front_before(worker) as sender:
        worker.__exit__()  # out of reach, still running: what is acked now is kept...
        before = failed_forwards()
        assert mention(sender, "EvGONE0000000001").status_code == 200
        time.sleep(1.0)
        assert failed_forwards() == before
        worker.gone = True  # ...until the worker exits for good
        wait_until(lambda: failed_forwards() == before + 1, what="the lost event counted")
