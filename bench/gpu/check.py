"""The GPU check's steps (bench/gpu_check.sh runs this): the trainer benchmark in bf16 on the GPU
with MFU, then vLLM on the GPU behind the gateway with the hot-swap under load. Each step runs
the benchmark script as its own process with a time limit and keeps its `RESULT {json}`; a step
that cannot run here is recorded with the reason. Writes bench/gpu/results.json.

    python bench/gpu/check.py [--cpu-only] [--model DIR] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported())
    return info


def run_step(name: str, cmd: list[str], timeout_s: float) -> dict:
    """One benchmark as a child process; its last `RESULT {json}` line, or why there is none."""
    started = time.perf_counter()
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s", "seconds": round(timeout_s, 1)}
    seconds = round(time.perf_counter() - started, 1)
    print(proc.stdout[-4000:], flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}", "seconds": seconds}
    return {"ok": True, "result": json.loads(lines[-1][len("RESULT "):]), "seconds": seconds}


def python_with_vllm() -> str | None:
    """A python that imports vLLM: the gateway's choice (FLYWHEEL_VLLM_PYTHON or .venv-vllm), or
    this one (a GPU image with vLLM installed system-wide)."""
    from gateway.vllm_server import vllm_python

    for python in (str(vllm_python()), sys.executable):
        if Path(python).is_file() and subprocess.run([python, "-c", "import vllm"], capture_output=True, check=False).returncode == 0:
            return python
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU parts (the plumbing runs in make test)")
    parser.add_argument("--model", type=Path, help="default: SmolLM2 if present (the tiny model with --cpu-only)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "gpu" / "results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    info = machine()
    report: dict = {"mode": "cpu-only" if args.cpu_only else "gpu", "machine": info}
    if not args.cpu_only and not info["cuda"]:
        sys.exit("no CUDA GPU visible to torch; run with --cpu-only to check the plumbing")
    smol, tiny = ROOT / "models" / "smollm2-135m-instruct", ROOT / "models" / "tiny-llama"
    model = args.model or (tiny if args.cpu_only or not (smol / "config.json").is_file() else smol)
    report["model"] = str(model)
    trainer_cmd = [sys.executable, "bench/trainer/run.py", "--quick", "--model", str(model),
                   "--out", str(args.out.with_name("trainer.json"))]
    if args.cpu_only:
        trainer_cmd += ["--items", "8", "--threads", "1"]
    report["trainer"] = run_step("trainer", trainer_cmd, 240)
    if args.cpu_only:
        report["gateway"] = {"ok": None, "skipped": "--cpu-only"}
    elif (python := python_with_vllm()) is None:
        report["gateway"] = {"ok": None, "skipped": "vLLM is not installed here and its GPU build cannot be "
                             "carried (no network); set FLYWHEEL_VLLM_PYTHON to a python that has it"}
    else:
        os.environ["FLYWHEEL_VLLM_PYTHON"] = python  # VLLMServer starts vLLM with it
        report["gateway"] = run_step("gateway", [sys.executable, "bench/gateway/run.py", "--quick", "--model",
                                                 str(model)], 300)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = [k for k in ("trainer", "gateway") if report[k].get("ok") is False]
    print(f"wrote {args.out} in {report['seconds']} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
