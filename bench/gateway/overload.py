"""Overload: rounds of 200 concurrent chat requests asking for max_tokens=4000 against a real
`flywheel gateway serve` (transformers backend, models/tiny-llama) with FLYWHEEL_MAX_NEW_TOKENS=16.

Targets: every 200 answer within the cap, the overflow answered 429 with Retry-After, no 5xx,
and the gateway's resident memory flat from round to round (it grows in the first round while
the model warms up; after that, growth under 20 MB over the remaining rounds).

    .venv/bin/python bench/gateway/overload.py [--quick] [--rounds N] [--concurrency N]

The last line is `RESULT {json}`."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flywheel.net import free_port  # noqa: E402

CAP, QUEUE, KEY = 16, 16, "bench-key"
MESSAGES = [{"role": "user", "content": "Write a very long story about the company."}]


def start_gateway(tmp: Path) -> tuple[subprocess.Popen, str]:
    from store.migrate import upgrade

    db = f"sqlite:///{tmp / 'flywheel.db'}"
    upgrade(db)
    port = free_port()
    env = {**os.environ, "FLYWHEEL_BASE_MODEL": str(ROOT / "models" / "tiny-llama"), "FLYWHEEL_DATABASE_URL": db,
           "FLYWHEEL_MAX_NEW_TOKENS": str(CAP), "FLYWHEEL_MAX_QUEUE": str(QUEUE), "FLYWHEEL_API_KEYS": KEY,
           "FLYWHEEL_ADAPTERS_DIR": str(tmp / "adapters"), "FLYWHEEL_DEVICE": "cpu", "FLYWHEEL_LOG_LEVEL": "WARNING"}
    log = open(tmp / "gateway.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "flywheel", "gateway", "serve", "--port", str(port)], env=env,
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited: {(tmp / 'gateway.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway not ready in 300 s")


async def one_round(url: str, concurrency: int) -> list[dict]:
    limits = httpx.Limits(max_connections=concurrency + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=600, headers={"Authorization": f"Bearer {KEY}"}) as client:
        async def ask(_i: int) -> dict:
            resp = await client.post(f"{url}/v1/chat/completions", json={
                "model": "production", "messages": MESSAGES, "max_tokens": 4000, "temperature": 0})
            body = resp.json()
            return {"status": resp.status_code, "retry_after": resp.headers.get("retry-after"),
                    "tokens": (body.get("usage") or {}).get("completion_tokens")}

        return await asyncio.gather(*(ask(i) for i in range(concurrency)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 6")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 6)
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        proc, url = start_gateway(Path(tmp))
        gw = psutil.Process(proc.pid)
        try:
            rss, results, started = [gw.memory_info().rss / 2**20], [], time.monotonic()
            for r in range(rounds):
                t0 = time.monotonic()
                res = asyncio.run(one_round(url, args.concurrency))
                results += res
                rss.append(gw.memory_info().rss / 2**20)
                counts = {s: sum(1 for x in res if x["status"] == s) for s in sorted({x["status"] for x in res})}
                print(f"round {r + 1}: {counts} in {time.monotonic() - t0:.1f} s, gateway RSS {rss[-1]:.0f} MB",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    ok = [x for x in results if x["status"] == 200]
    refused = [x for x in results if x["status"] == 429]
    result = {
        "requests": len(results), "rounds": rounds, "concurrency": args.concurrency, "cap": CAP, "queue": QUEUE,
        "ok": len(ok), "rejected_429": len(refused), "other": len(results) - len(ok) - len(refused),
        "max_completion_tokens": max((x["tokens"] or 0 for x in ok), default=0),
        "all_within_cap": all(x["tokens"] is not None and x["tokens"] <= CAP for x in ok),
        "all_429_have_retry_after": all(x["retry_after"] for x in refused),
        "rss_mb": [round(v, 1) for v in rss],
        "rss_growth_after_first_round_mb": round(rss[-1] - rss[1], 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    result["pass"] = (result["all_within_cap"] and result["all_429_have_retry_after"] and result["other"] == 0
                      and result["rejected_429"] > 0 and result["rss_growth_after_first_round_mb"] < 20)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
