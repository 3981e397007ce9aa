"""Gateway benchmark: latency and throughput through the gateway vs direct to vLLM, and the time
from a production alias change to the first response served by the new version.

    .venv/bin/python bench/gateway/run.py [--model models/tiny-llama] [--concurrency 1,4,16]

Starts (or uses --vllm-url) one vLLM server, a gateway process (vllm backend) in front of it,
a throwaway SQLite store and PEFT adapters, then prints a table and a final `RESULT {json}` line
with the swap times and the rollback target (under 5 s: the previous version stays loaded).
Prints numbers; not a test."""
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

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.vllm_server import VLLMServer, free_port

ADMIN = "bench-admin"
MESSAGES = [{"role": "user", "content": "Say hi."}]


def make_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, local_files_only=True)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(url: str, model: str, concurrency: int, total: int, max_tokens: int) -> dict:
    """`concurrency` workers share `total` chat completions; returns latencies and throughput."""
    latencies: list[float] = []
    failures = 0
    remaining = total
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker():
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                resp = await client.post(f"{url}/v1/chat/completions", json=body)
                if resp.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"lat": latencies, "failures": failures, "rps": len(latencies) / wall}


async def swap_time(gateway: str, target: str | None, push: bool, timeout_s: float = 30.0) -> tuple[float, int, int]:
    """Move production to `target` and poll with requests until one is served by it.
    Returns (seconds from the alias commit to that response, requests sent, failures)."""
    from store.db import session_scope
    from store.versions import PRODUCTION, move_alias

    label = target or "base"
    sent = failures = 0
    async with httpx.AsyncClient(timeout=60) as client:
        with session_scope() as session:
            move_alias(session, PRODUCTION, target, actor="bench")
        moved = time.perf_counter()
        if push:
            asyncio.get_running_loop().create_task(
                client.post(f"{gateway}/admin/sync", headers={"Authorization": f"Bearer {ADMIN}"}))
        while time.perf_counter() - moved < timeout_s:
            resp = await client.post(f"{gateway}/v1/chat/completions",
                                     json={"model": "production", "messages": MESSAGES, "max_tokens": 1})
            sent += 1
            if resp.status_code != 200:
                failures += 1
            elif resp.headers.get("x-flywheel-model-version") == label:
                return time.perf_counter() - moved, sent, failures
        raise RuntimeError(f"{label} not served within {timeout_s}s")


def start_gateway(args, vllm_url: str, base_name: str, adapters: Path, db_url: str, work: Path):
    port = free_port()
    env = {**os.environ, "FLYWHEEL_BACKEND": "vllm", "FLYWHEEL_VLLM_URLS": vllm_url,
           "FLYWHEEL_BASE_MODEL": str(args.model), "FLYWHEEL_ADAPTERS_DIR": str(adapters),
           "FLYWHEEL_DATABASE_URL": db_url, "FLYWHEEL_ADMIN_TOKEN": ADMIN, "FLYWHEEL_VLLM_BASE_NAME": base_name,
           "FLYWHEEL_REPLICA_ID": "bench", "FLYWHEEL_LOG_LEVEL": "WARNING"}
    log = open(work / "gateway.log", "wb")  # noqa: SIM115 - the child process keeps writing to it
    proc = subprocess.Popen([sys.executable, "-c", "from gateway.commands import gateway_app; gateway_app()",
                             "serve", "--port", str(port)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"gateway did not get ready:\n{(work / 'gateway.log').read_text()[-2000:]}")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), to report the gateway's own cost."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def row(name: str, r: dict) -> str:
    lat = [x * 1000 for x in r["lat"]]
    return (f"{name:<9} p50 {statistics.median(lat):8.2f} ms  p99 {pct(lat, 0.99):8.2f} ms  "
            f"{r['rps']:8.1f} req/s  failures {r['failures']}")


async def bench(args, vllm_url: str, gateway: str, base_name: str, gateway_pid: int) -> None:
    print(f"\n## Latency and throughput: chat completions, max_tokens={args.max_tokens}, "
          f"{args.requests} requests per run, runs alternate direct/gateway x{args.rounds}")
    for conc in args.concurrency:
        await load(vllm_url, base_name, conc, conc * 4, args.max_tokens)  # warm up both paths
        await load(gateway, "production", conc, conc * 4, args.max_tokens)
        merged = {"direct": {"lat": [], "failures": 0, "rps": []}, "gateway": {"lat": [], "failures": 0, "rps": []}}
        cpu = 0.0
        for _ in range(args.rounds):
            for name, url, model in (("direct", vllm_url, base_name), ("gateway", gateway, "production")):
                before = process_cpu_s(gateway_pid)
                r = await load(url, model, conc, args.requests, args.max_tokens)
                if name == "gateway":
                    cpu += process_cpu_s(gateway_pid) - before
                merged[name]["lat"] += r["lat"]
                merged[name]["failures"] += r["failures"]
                merged[name]["rps"].append(r["rps"])
        print(f"\nconcurrency {conc}")
        results = {}
        for name in ("direct", "gateway"):
            m = merged[name]
            results[name] = {"lat": m["lat"], "failures": m["failures"], "rps": statistics.mean(m["rps"])}
            print("  " + row(name, results[name]))
        d, g = results["direct"], results["gateway"]
        added = (statistics.median(g["lat"]) - statistics.median(d["lat"])) * 1000
        loss = (1 - g["rps"] / d["rps"]) * 100
        print(f"  gateway adds {added:+.2f} ms at p50, throughput change {-loss:+.1f}%, gateway process CPU "
              f"{cpu / (args.requests * args.rounds) * 1000:.2f} ms per request, load average {os.getloadavg()[0]:.1f}")


ROLLBACK_TARGET_S = 5.0  # a rollback to the kept previous version needs no load (was a test assertion)


async def swaps(gateway: str) -> None:
    print("\n## Alias change -> first response from the new version (requests keep flowing)")
    measured = {}
    for key, label, target, push in (("poll_new", "poll (2 s interval), new adapter", "ft-0001", False),
                                     ("sync_new", "POST /admin/sync, new adapter", "ft-0002", True),
                                     ("sync_rollback", "POST /admin/sync, rollback (kept loaded)", "ft-0001", True),
                                     ("poll_base", "poll (2 s interval), back to base", None, False)):
        seconds, sent, failures = await swap_time(gateway, target, push)
        measured[key] = {"s": round(seconds, 3), "requests": sent, "failed": failures}
        print(f"  {label:<42} {seconds * 1000:8.1f} ms  ({sent} requests, {failures} failed)")
    rollback = measured["sync_rollback"]["s"]
    print("RESULT " + json.dumps({"swaps": measured, "target_rollback_s": ROLLBACK_TARGET_S,
                                  "rollback_ok": rollback < ROLLBACK_TARGET_S}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-llama")
    parser.add_argument("--vllm-url", help="use this running vLLM server (started with --enable-lora)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=200, help="requests per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/gateway runs per level")
    parser.add_argument("--max-tokens", type=int, default=1)
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.model = args.model.resolve()
    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    db_url = f"sqlite:///{work / 'flywheel.db'}"
    os.environ["FLYWHEEL_DATABASE_URL"] = db_url
    os.environ.setdefault("FLYWHEEL_LOG_LEVEL", "WARNING")

    import logging

    from flywheel.adapters import adapter_digest, base_model_id
    from store.db import session_scope
    from store.migrate import upgrade
    from store.versions import register_version

    upgrade(db_url)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    adapters = work / "adapters"
    for i, name in enumerate(("ft-0001", "ft-0002")):
        path = make_adapter(args.model, adapters / name, seed=i + 1)
        with session_scope() as session:
            register_version(session, name=name, adapter_path=str(path), adapter_sha256=adapter_digest(path),
                             base_model=base_model_id(args.model), gate_passed=True, gate_reasons=[])
    vllm = None
    if args.vllm_url:
        vllm_url = args.vllm_url.rstrip("/")
    else:
        started = time.perf_counter()
        vllm = VLLMServer(args.model).start()
        vllm_url = vllm.url
        print(f"vLLM server ready in {time.perf_counter() - started:.1f} s")
    base_name = next(m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"] if not m.get("parent"))
    proc = None
    try:
        proc, gateway = start_gateway(args, vllm_url, base_name, adapters, db_url, work)
        print(f"model {args.model.name}, vLLM {vllm_url}, gateway {gateway}, {os.cpu_count()} CPUs")
        asyncio.run(bench(args, vllm_url, gateway, base_name, proc.pid))
        asyncio.run(swaps(gateway))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if vllm is not None:
            vllm.cleanup()


if __name__ == "__main__":
    main()
