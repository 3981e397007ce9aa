"""Bot benchmark: ack latency (p50/p99) and events/s for signed Slack events sent 50 at a time,
while the real gateway (tiny model) answers every one of them. Five consecutive runs by default
(the target: ack p99 <= 100 ms in 5 of 5); the last line is `RESULT {json}` with p99_ms per run.

    .venv/bin/python bench/bot/run.py [--quick] [--runs 5] [--events 300] [--concurrency 50]
                                      [--model models/tiny-llama] [--out FILE]

Deployed as in production, one process each: the bot (`flywheel bot serve`: its ack front and
the bot worker behind it, FLYWHEEL_BOT_ACK_PROCESS=0 for the single process), the gateway
(`flywheel gateway serve` with the model), the local Slack double, and this load generator.
The store is a fresh SQLite file (or --database-url)."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flywheel.net import free_port

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PY = sys.executable
SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench-token"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))]



class StartupFailed(RuntimeError):
    """A process of the deployment exited or did not get ready."""


def wait_http(url: str, proc: subprocess.Popen, timeout: float, name: str) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartupFailed(f"{name} exited with {proc.returncode} during startup")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise StartupFailed(f"{name} not ready after {timeout}s ({url})")


async def fire(url: str, bodies: list[str], sender, concurrency: int) -> tuple[list[float], list[int], float]:
    """Send every body, `concurrency` at a time. aiohttp, not httpx: the generator must not be
    the bottleneck (httpx's async client managed ~200 requests/s on this machine, aiohttp ~5000)."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    statuses: list[int] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as client:
        async def one(body: str) -> None:
            async with sem:
                headers = sender.headers(body)  # signed just before sending, as Slack does
                t0 = time.perf_counter()
                async with client.post(url, data=body.encode(), headers=headers) as resp:
                    await resp.read()
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses.append(resp.status)

        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - started
    return latencies, statuses, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="consecutive runs, each with fresh processes and store")
    ap.add_argument("--quick", action="store_true", help="150 events per run")
    ap.add_argument("--events", type=int, default=300, help="events to send (each one is answered)")
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-llama")
    ap.add_argument("--max-tokens", type=int, default=8, help="tokens per answer")
    ap.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    ap.add_argument("--answer-timeout", type=float, default=600.0)
    ap.add_argument("--kind", choices=["mention", "reaction"], default="mention",
                    help="reaction: events that need no answer (isolates the ack path)")
    ap.add_argument("--out", type=Path, default=None, help="also write every run's JSON result here")
    args = ap.parse_args()
    if args.quick:
        args.events = min(args.events, 150)
    runs = []
    for i in range(args.runs):
        for attempt in range(3):
            try:
                result = one_run(args)
                break
            except StartupFailed as exc:  # a port picked free was taken before the process bound it
                if attempt == 2:
                    raise SystemExit(str(exc)) from None
                print(f"run {i + 1}: {exc}; starting it again", flush=True)
        runs.append(result)
        print(f"run {i + 1}/{args.runs}: ack p50 {result['ack_ms']['p50']} ms, p99 {result['ack_ms']['p99']} ms, "
              f"{result.get('answers_per_s', '-')} answers/s, load average {result['load_average_1m']}", flush=True)
    p99 = [r["ack_ms"]["p99"] for r in runs]
    summary = {"p99_ms": p99, "runs_ok": sum(1 for x in p99 if x <= 100), "runs": len(runs), "target_ms": 100,
               "p50_ms": [r["ack_ms"]["p50"] for r in runs], "answers_per_s": [r.get("answers_per_s") for r in runs],
               "non_200": sum(r["non_200"] for r in runs), "events": args.events, "concurrency": args.concurrency}
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"ack p99 <= 100 ms in {summary['runs_ok']} of {len(runs)} runs")
    print("RESULT " + json.dumps(summary))


def one_run(args) -> dict:
    """Fresh store and processes, one burst of events; the run's JSON result."""
    tmp, url, model = fresh_store(args)
    slack_port, gw_port, bot_port = free_port(), free_port(), free_port()
    env = deployment_env(args, tmp, url, slack_port, gw_port)
    logs = {name: open(tmp / f"{name}.log", "w") for name in ("slack", "gateway", "bot")}  # noqa: SIM115 - closed in finally
    procs = start_slack_and_gateway(env, logs, model, slack_port, gw_port)
    try:
        sender = start_bot(procs, env, logs, gw_port, bot_port)
        burst = send_burst(args, sender)
        return run_result(args, url, bot_port, burst)
    finally:
        stop(procs, logs)


def fresh_store(args) -> tuple[Path, str, Path]:
    """A temporary folder and a migrated store in it (or --database-url); the resolved model."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-bot-"))
    url = args.database_url or f"sqlite:///{tmp / 'flywheel.db'}"
    os.environ["FLYWHEEL_DATABASE_URL"] = url

    from flywheel.modelfiles import read_marker
    from store.migrate import upgrade

    model = args.model.resolve()
    if read_marker(model) is None:
        sys.exit(f"no model at {args.model}: run `make model` (or pass --model)")
    upgrade(url)
    return tmp, url, model


def deployment_env(args, tmp: Path, url: str, slack_port: int, gw_port: int) -> dict[str, str]:
    """The environment every process of the deployment starts with."""
    env = {**os.environ, "FLYWHEEL_DATABASE_URL": url, "FLYWHEEL_LOG_LEVEL": "WARNING",
           "FLYWHEEL_MAX_NEW_TOKENS": str(args.max_tokens), "FLYWHEEL_ADAPTERS_DIR": str(tmp / "adapters"),
           "FLYWHEEL_REPLICA_ID": "bench", "HF_HUB_OFFLINE": "1",
           "SLACK_BOT_TOKEN": TOKEN, "SLACK_SIGNING_SECRET": SECRET,
           "SLACK_API_URL": f"http://127.0.0.1:{slack_port}/api/",
           "FLYWHEEL_GATEWAY_URL": f"http://127.0.0.1:{gw_port}", "FLYWHEEL_MAX_TOKENS": str(args.max_tokens),
           "FLYWHEEL_REPORTS_ENABLED": "false", "FLYWHEEL_STREAM_UPDATE_INTERVAL_S": "1.0"}
    env.pop("SLACK_APP_TOKEN", None)
    return env


def start_slack_and_gateway(env: dict, logs: dict, model: Path, slack_port: int,
                            gw_port: int) -> dict[str, subprocess.Popen]:
    """The local Slack double and the gateway with the model, started (not yet waited for)."""
    return {
        "slack": subprocess.Popen([PY, "-m", "flywheel.app.demo.slack_double", "--port", str(slack_port),
                                   "--token", TOKEN], cwd=ROOT, env=env, stdout=logs["slack"],
                                  stderr=subprocess.STDOUT),
        "gateway": subprocess.Popen([PY, "-m", "flywheel", "gateway", "serve", "--port", str(gw_port),
                                     "--base-model", str(model)], cwd=ROOT, env=env, stdout=logs["gateway"],
                                    stderr=subprocess.STDOUT),
    }


def start_bot(procs: dict, env: dict, logs: dict, gw_port: int, bot_port: int):
    """Once the gateway is ready, the bot (added to `procs`); a sender of signed events to it."""
    from flywheel.app.demo.slack_double import SlackSender

    wait_http(f"http://127.0.0.1:{gw_port}/readyz", procs["gateway"], 300, "gateway")
    procs["bot"] = subprocess.Popen([PY, "-m", "flywheel", "bot", "serve", "--port", str(bot_port)], cwd=ROOT,
                                    env=env, stdout=logs["bot"], stderr=subprocess.STDOUT)
    wait_http(f"http://127.0.0.1:{bot_port}/healthz", procs["bot"], 60, "bot")
    return SlackSender(f"http://127.0.0.1:{bot_port}/slack/events", SECRET)


def event_body(sender, kind: str, i: int) -> str:
    """A signed-to-be event: a mention with question number i, or (kind reaction, i >= 0) a +1."""
    from flywheel.app.demo.slack_double import BOT_USER_ID

    ts = sender.next_ts()
    if kind == "reaction" and i >= 0:
        return sender.event_body({"type": "reaction_added", "user": "UBENCH01", "reaction": "+1",
                                  "item_user": BOT_USER_ID, "event_ts": ts,
                                  "item": {"type": "message", "channel": "CBENCH000", "ts": ts}})
    return sender.event_body({
        # a person each: the bot's fair lines give one person 2 answers written + 5 waiting and tell
        # the rest "too many questions", which is not what this measures
        "type": "app_mention", "user": f"UBENCH{i + 1:03d}", "channel": f"CBENCH{i % 20:03d}",
        "text": f"<@{BOT_USER_ID}> question number {i}: what is the refund policy?",
        "ts": ts, "event_ts": ts})


def send_burst(args, sender) -> dict:
    """A warm-up event, then the burst; waits for the answers (mentions). Latencies, statuses,
    wall seconds, answers and the seconds until the last of them."""
    asyncio.run(fire(sender.url, [event_body(sender, args.kind, -1)], sender, 1))  # warm-up: auth.test, pools
    bodies = [event_body(sender, args.kind, i) for i in range(args.events)]
    fired_at = time.perf_counter()
    latencies, statuses, wall = asyncio.run(fire(sender.url, bodies, sender, args.concurrency))
    answered = wait_answers(args, len(bodies))
    return {"latencies": latencies, "statuses": statuses, "wall": wall, "answered": answered,
            "answers_s": time.perf_counter() - fired_at, "sent": len(bodies)}


def wait_answers(args, expected: int) -> int:
    """Answers in the store (the warm-up's left out) once all `expected` are there, or at the
    answer timeout; at once for events that need no answer."""
    from store.conversations import count_messages
    from store.db import session_scope
    from store.models import Role

    deadline, answered = time.monotonic() + args.answer_timeout, 0
    while time.monotonic() < deadline:
        with session_scope() as s:
            answered = count_messages(s, Role.assistant) - 1  # minus the warm-up
        if answered >= expected or args.kind != "mention":
            break
        time.sleep(0.25)
    return answered


def run_result(args, url: str, bot_port: int, burst: dict) -> dict:
    """The run's JSON result: the acks as the sender saw them, the bot's own metrics, the answers."""
    import httpx

    latencies, statuses, answered = burst["latencies"], burst["statuses"], burst["answered"]
    served = httpx.get(f"http://127.0.0.1:{bot_port}/metrics", timeout=5).text
    result = {
        "events": len(latencies), "concurrency": args.concurrency, "database": url.split(":", 1)[0],
        "ack_ms": {"p50": round(statistics.median(latencies), 1), "p99": round(percentile(latencies, 99), 1),
                   "max": round(max(latencies), 1), "mean": round(statistics.fmean(latencies), 1)},
        "events_per_s": round(len(latencies) / burst["wall"], 1),
        "non_200": sum(1 for s in statuses if s != 200),
        "kind": args.kind, "max_tokens": args.max_tokens,
        "target_ack_p99_ms": 100, "ack_p99_ok": percentile(latencies, 99) <= 100,
        "bot_answers_ok": _metric(served, 'flywheel_bot_answers_total{outcome="ok"}'),
        # the bot's own view: time from request read to response, without client or accept queueing
        "server_ack_ms_mean": _server_mean_ms(served, "event"),
        "server_ack_share_under_100ms": _server_share(served, "event", "0.1"),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    if args.kind == "mention":
        result.update(answered=answered, all_answered=answered >= burst["sent"],
                      answers_per_s=round(answered / burst["answers_s"], 2))
    return result


def stop(procs: dict, logs: dict) -> None:
    """Terminate every process of the deployment (killed after 20 s) and close their logs."""
    for proc in procs.values():
        proc.terminate()
    for proc in procs.values():
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    for f in logs.values():
        f.close()


def _server_mean_ms(text: str, kind: str) -> float | None:
    total = _metric(text, f'flywheel_bot_request_seconds_sum{{kind="{kind}"}}')
    count = _metric(text, f'flywheel_bot_request_seconds_count{{kind="{kind}"}}')
    return round(1000 * total / count, 2) if total is not None and count else None


def _server_share(text: str, kind: str, le: str) -> float | None:
    under = _metric(text, f'flywheel_bot_request_seconds_bucket{{kind="{kind}",le="{le}"}}')
    count = _metric(text, f'flywheel_bot_request_seconds_count{{kind="{kind}"}}')
    return round(under / count, 4) if under is not None and count else None


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name):
            return float(line.rsplit(" ", 1)[1])
    return None


if __name__ == "__main__":
    main()
