"""Start and stop a local vLLM OpenAI server (the CPU build in .venv-vllm, or an official vllm
install) for tests, benchmarks and the demo. Production runs vLLM as its own service."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from flywheel.basemodel import parse_ref
from flywheel.logs import get_logger
from flywheel.net import free_port  # noqa: F401  (re-exported for callers)

log = get_logger("gateway.vllm_server")
logging.getLogger("httpx").setLevel(logging.WARNING)
DEFAULT_VENV = Path(".venv-vllm")


class VLLMServerError(RuntimeError):
    """vLLM is not installed, or the server died or did not get ready in time (log tail included)."""


def vllm_python(venv: Path | str | None = None) -> Path:
    """The python that has vLLM: FLYWHEEL_VLLM_PYTHON, else <venv>/bin/python (`make vllm`)."""
    if os.environ.get("FLYWHEEL_VLLM_PYTHON"):
        return Path(os.environ["FLYWHEEL_VLLM_PYTHON"])
    venv = Path(venv or os.environ.get("FLYWHEEL_VLLM_VENV", DEFAULT_VENV))
    return venv / "bin" / "python"


def vllm_available(venv: Path | str | None = None) -> bool:
    python = vllm_python(venv)
    return python.is_file() and any((python.parent.parent / "lib").glob("python3*/site-packages/vllm/__init__.py"))


# A watchdog process: when the process that started vLLM dies (even by SIGKILL, when nothing in
# it can clean up) the watchdog is re-parented, notices within half a second, and takes vLLM's
# whole process group (API server, engine core, workers) down: SIGTERM, then SIGKILL.
WATCHDOG = """
import os, signal, sys, time
pgid, parent = int(sys.argv[1]), int(sys.argv[2])
def stop(*_):
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            os._exit(0)
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                os._exit(0)
            time.sleep(0.2)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
while os.getppid() == parent:
    time.sleep(0.5)
stop()
"""


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` with runtime LoRA loading enabled."""

    def __init__(self, model: Path | str, *, served_name: str | None = None, port: int | None = None,
                 max_lora_rank: int = 16, max_loras: int = 2, max_model_len: int = 1024,
                 kv_cache_gb: int = 2, venv: Path | str | None = None, extra_args: list[str] | None = None,
                 die_with_parent: bool = True, cpus: set[int] | None = None):
        """`model`: a folder or a Hub id, `org/name[@revision]` (flywheel.basemodel); vLLM fetches
        a Hub model itself, through huggingface_hub with this process's HF_TOKEN, cache and
        HF_HUB_OFFLINE. `die_with_parent`: stop vLLM when this process dies without calling
        stop() (POSIX). `cpus`: run vLLM (API server, engine core, workers) on these CPUs only
        (Linux, taskset), so a benchmark can keep it off the cores the gateway and the load
        generator use."""
        ref = parse_ref(model)
        folder = ref.folder.resolve() if ref.folder is not None else None
        self.model = str(folder) if folder is not None else ref.repo_id
        self.served_name = served_name or (folder.name if folder is not None else ref.repo_id)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = vllm_python(venv)
        self.args = [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            *(["--revision", ref.revision] if ref.revision else []),
            "--served-model-name", self.served_name, "--enable-lora", "--max-lora-rank", str(max_lora_rank),
            "--max-loras", str(max_loras), "--dtype", "bfloat16", "--max-model-len", str(max_model_len),
            "--host", "127.0.0.1", "--port", str(self.port), *(extra_args or []),
        ]
        # A folder needs nothing from the Hub: keep vLLM from looking anything up for it.
        offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} if folder is not None else {}
        self.env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                    "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb), **offline,
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if cpus:  # taskset pins before it execs vLLM: every process vLLM starts inherits the affinity
            self.args = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *self.args]
        self.die_with_parent = die_with_parent
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self.logdir = Path(tempfile.mkdtemp(prefix="vllm-server-"))
        self.logfile = self.logdir / "server.log"

    def start(self, timeout_s: float = 300.0) -> VLLMServer:
        if not self.python.is_file():
            raise VLLMServerError(f"no vLLM python at {self.python}: run `make vllm` (or set FLYWHEEL_VLLM_PYTHON)")
        log.info("vllm_starting", model=self.model, port=self.port, log=str(self.logfile))
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        if self.die_with_parent and os.name == "posix":
            self.watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(self.proc.pid), str(os.getpid())],
                                             stdin=subprocess.DEVNULL)
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc.poll() is not None:
                raise VLLMServerError(f"vLLM exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    log.info("vllm_ready", port=self.port, seconds=round(time.monotonic() - started, 1))
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise VLLMServerError(f"vLLM not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            import signal

            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: engine workers go too
                self.proc.wait(timeout=timeout_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.proc = None
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait(timeout=10)
            self.watchdog = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.logdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


if __name__ == "__main__":  # python -m gateway.vllm_server MODEL [PORT]
    server = VLLMServer(sys.argv[1], port=int(sys.argv[2]) if len(sys.argv) > 2 else None).start()
    print(server.url, flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.cleanup()
