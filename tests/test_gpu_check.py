"""bench/gpu_check.sh, the script to run whenever a GPU machine is lent, checked here with its
GPU parts skipped: it installs nothing that is already there, runs the trainer benchmark end to
end (baseline and ours, one epoch each, on the tiny model) and writes its results file."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_cpu_only_and_writes_results(tmp_path, tiny_model_dir):
    out = tmp_path / "results.json"
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-only", "--model", str(tiny_model_dir),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-only" and report["machine"]["cuda"] in (False, True)
    trainer = report["trainer"]
    assert trainer["ok"] is True, trainer
    result = trainer["result"]
    assert result["items"] == 8 and result["speedup"] > 0 and result["ours_tokens_per_s"] > 0
    assert 0 < result["ours_peak_fraction"] < 1 and result["matmul_peak_gflops"]["fp32"] > 0
    assert report["gateway"] == {"ok": None, "skipped": "--cpu-only"}
    assert (tmp_path / "trainer.json").is_file()
