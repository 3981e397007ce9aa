"""Gateway benchmark: latency and throughput through the gateway vs direct to vLLM, the gateway's
CPU per request, and the time from a production alias change to the first response served by the
new version.

    .venv/bin/python bench/gateway/run.py [--quick] [--model models/tiny-llama] [--concurrency 1,4,16]

Starts (or uses --vllm-url) one vLLM server, a gateway process (vllm backend) in front of it,
a throwaway SQLite store and PEFT adapters. vLLM runs on CPU 0, the gateway and the load
generator on CPU 1 (--pin), so the gateway's CPU shows as its own cost rather than as time taken
from the engine. Runs alternate direct/gateway per concurrency level. Prints a table and, last,
one `RESULT {json}` line: p50_added_ms and throughput_loss (a fraction) at concurrency 1 and per
level, cpu_ms_per_request (gateway process CPU over all gateway requests; `_net` without its
idle background: the store poll every 2 s), the swap times and the rollback target (under 5 s:
the previous version stays loaded). --quick: 60 requests per run instead of 200 (under a minute
on 2 cores, vLLM's start included). Prints numbers; not a test."""
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

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.vllm_server import VLLMServer, free_port

ADMIN = "bench-admin"
MESSAGES = [{"role": "user", "content": "Say hi."}]


def make_adapter(base_dir: Path, out_dir: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from flywheel.basemodel import load_causal_lm

    torch.manual_seed(seed)
    model = load_causal_lm(base_dir, "cpu")
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(url: str, model: str, concurrency: int, total: int, max_tokens: int) -> dict:
    """`concurrency` workers share `total` chat completions; returns latencies and throughput.
    aiohttp, not httpx: a lighter client leaves more of the shared core to the gateway."""
    latencies: list[float] = []
    failures = 0
    remaining = total
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def worker():
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with client.post(f"{url}/v1/chat/completions", data=body, headers=headers) as resp:
                    await resp.read()
                if resp.status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"lat": latencies, "failures": failures, "rps": len(latencies) / wall, "wall": wall}


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


def summary(r: dict) -> dict:
    lat = [x * 1000 for x in r["lat"]]
    return {"p50_ms": round(statistics.median(lat), 3), "p99_ms": round(pct(lat, 0.99), 3),
            "rps": round(statistics.mean(r["rps"]), 1), "failures": r["failures"]}


def idle_cpu_ms_per_s(gateway_pid: int, seconds: float) -> float:
    """The gateway's CPU with no traffic (its store poll, health checks), to tell apart from
    what requests cost."""
    before = process_cpu_s(gateway_pid)
    time.sleep(seconds)
    return (process_cpu_s(gateway_pid) - before) / seconds * 1000


async def bench(args, vllm_url: str, gateway: str, base_name: str, gateway_pid: int, idle_ms_s: float) -> dict:
    print(f"\n## Latency and throughput: chat completions, max_tokens={args.max_tokens}, "
          f"{args.requests} requests per run, runs alternate direct/gateway x{args.rounds}")
    levels = {}
    total_cpu = total_wall = total_served = 0.0
    for conc in args.concurrency:
        warm = conc * (2 if args.quick else 4)
        await load(vllm_url, base_name, conc, warm, args.max_tokens)  # warm up both paths
        await load(gateway, "production", conc, warm, args.max_tokens)
        merged = {name: {"lat": [], "failures": 0, "rps": []} for name in ("direct", "gateway")}
        cpu = wall = 0.0
        for _ in range(args.rounds):
            for name, url, model in (("direct", vllm_url, base_name), ("gateway", gateway, "production")):
                before = process_cpu_s(gateway_pid)
                r = await load(url, model, conc, args.requests, args.max_tokens)
                if name == "gateway":
                    cpu += process_cpu_s(gateway_pid) - before
                    wall += r["wall"]
                merged[name]["lat"] += r["lat"]
                merged[name]["failures"] += r["failures"]
                merged[name]["rps"].append(r["rps"])
        d, g = summary(merged["direct"]), summary(merged["gateway"])
        served = args.requests * args.rounds
        total_cpu, total_wall, total_served = total_cpu + cpu, total_wall + wall, total_served + served
        level = {"direct": d, "gateway": g, "p50_added_ms": round(g["p50_ms"] - d["p50_ms"], 3),
                 "throughput_loss": round(1 - g["rps"] / d["rps"], 4),
                 "cpu_ms_per_request": round(cpu / served * 1000, 3),
                 "cpu_ms_per_request_net": round((cpu * 1000 - idle_ms_s * wall) / served, 3)}
        levels[str(conc)] = level
        print(f"\nconcurrency {conc}")
        for name, s in (("direct", d), ("gateway", g)):
            print(f"  {name:<9} p50 {s['p50_ms']:8.2f} ms  p99 {s['p99_ms']:8.2f} ms  {s['rps']:8.1f} req/s  "
                  f"failures {s['failures']}")
        print(f"  gateway adds {level['p50_added_ms']:+.2f} ms at p50, throughput change "
              f"{-level['throughput_loss'] * 100:+.1f}%, gateway process CPU {level['cpu_ms_per_request']:.3f} ms "
              f"per request ({level['cpu_ms_per_request_net']:.3f} without its idle {idle_ms_s:.1f} ms/s), "
              f"load average {os.getloadavg()[0]:.1f}")
    first = levels[str(args.concurrency[0])]
    return {"p50_added_ms": first["p50_added_ms"], "throughput_loss": first["throughput_loss"],
            "at_concurrency": args.concurrency[0], "cpu_ms_per_request": round(total_cpu / total_served * 1000, 3),
            "cpu_ms_per_request_net": round((total_cpu * 1000 - idle_ms_s * total_wall) / total_served, 3),
            "idle_cpu_ms_per_s": round(idle_ms_s, 2), "levels": levels}


ROLLBACK_TARGET_S = 5.0  # a rollback to the kept previous version needs no load (was a test assertion)


async def swaps(gateway: str) -> dict:
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
    return {"swaps": measured, "target_rollback_s": ROLLBACK_TARGET_S, "rollback_ok": rollback < ROLLBACK_TARGET_S}


def cpu_list(text: str) -> set[int]:
    """CPU ids in taskset's list format: 0-2,5 -> {0, 1, 2, 5}."""
    cpus = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def main() -> None:
    args = parse_args()
    if args.gateway_cpus is not None:
        os.sched_setaffinity(0, args.gateway_cpus)  # this process, and the gateway it starts, inherit it
    work = Path(tempfile.mkdtemp(prefix="flywheel-bench-"))
    db_url = f"sqlite:///{work / 'flywheel.db'}"
    adapters = store_with_adapters(args, work, db_url)
    vllm, vllm_url = start_vllm(args)
    base_name = next(m["id"] for m in httpx.get(f"{vllm_url}/v1/models").json()["data"] if not m.get("parent"))
    proc = None
    try:
        proc, gateway = start_gateway(args, vllm_url, base_name, adapters, db_url, work)
        print_placement(args, vllm, vllm_url, gateway, proc)
        idle = idle_cpu_ms_per_s(proc.pid, 4 if args.quick else 10)
        result = asyncio.run(bench(args, vllm_url, gateway, base_name, proc.pid, idle))
        result.update(asyncio.run(swaps(gateway)), quick=args.quick, pin=args.pin, model=args.model.name)
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if vllm is not None:
            vllm.cleanup()


def parse_args() -> argparse.Namespace:
    """The options, with --concurrency as a list, --requests filled in and --pin as CPU sets
    (args.vllm_cpus, args.gateway_cpus; None with --pin none)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-llama")
    parser.add_argument("--vllm-url", help="use this running vLLM server (started with --enable-lora)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (200; 60 with --quick)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating direct/gateway runs per level")
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer requests and a shorter idle measurement")
    parser.add_argument("--pin", default="0:1", help="VLLM_CPUS:GATEWAY_CPUS, e.g. 0-5:6,7 ('none': no pinning); "
                        "the load generator shares the gateway's CPUs")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.requests = args.requests or (60 if args.quick else 200)
    args.model = args.model.resolve()
    args.vllm_cpus = args.gateway_cpus = None
    if args.pin != "none":
        args.vllm_cpus, args.gateway_cpus = (cpu_list(part) for part in args.pin.split(":"))
        if not (args.vllm_cpus | args.gateway_cpus) <= os.sched_getaffinity(0):
            parser.error(f"--pin {args.pin}: this machine offers CPUs {sorted(os.sched_getaffinity(0))} (or --pin none)")
    return args


def store_with_adapters(args, work: Path, db_url: str) -> Path:
    """A migrated SQLite store in `work` (this process's store from now on) with two PEFT adapters
    of the model registered in it, ft-0001 and ft-0002; the adapters' folder."""
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
    return adapters


def start_vllm(args) -> tuple[VLLMServer | None, str]:
    """The vLLM server to measure against: --vllm-url's (None: not ours to stop), or one started
    on the model, on --pin's CPUs."""
    if args.vllm_url:
        return None, args.vllm_url.rstrip("/")
    started = time.perf_counter()
    vllm = VLLMServer(args.model, cpus=args.vllm_cpus).start()
    print(f"vLLM server ready in {time.perf_counter() - started:.1f} s")
    return vllm, vllm.url


def print_placement(args, vllm: VLLMServer | None, vllm_url: str, gateway: str, proc: subprocess.Popen) -> None:
    cpus = f"gateway and load generator on CPUs {sorted(os.sched_getaffinity(proc.pid))}"
    if vllm is not None:
        cpus += f", vLLM on {sorted(os.sched_getaffinity(vllm.proc.pid))}"
    print(f"model {args.model.name}, vLLM {vllm_url}, gateway {gateway}, {os.cpu_count()} CPUs, {cpus}")


if __name__ == "__main__":
    main()
