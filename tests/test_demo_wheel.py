"""`flywheel demo run` from the built wheel, outside the checkout: the demo (and the Slack double
it drives) must ship in the package, not lean on tests/ or the source tree being importable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from flywheel.modelfiles import build_tiny_llama, default_embedder_dir

ROOT = Path(__file__).resolve().parents[1]


def _wheel(tmp_path: Path) -> Path:
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, cwd=tmp_path, timeout=300)
    (wheel,) = out.glob("flywheel-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp_path: Path) -> Path:
    """A fresh venv holding only the wheel; the heavy dependencies (torch, transformers, …) come
    from this test's venv through a .pth line, which adds their directory without running its
    .pth files, so the checkout's editable install stays out."""
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    return python


def test_demo_runs_from_the_installed_wheel(base_model_dir, tmp_path):
    python = _venv_with(_wheel(tmp_path), tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLYWHEEL_", "SLACK_", "PYTHON"))}
    where = subprocess.run([str(python), "-c", "import flywheel, importlib.util as u; print(flywheel.__file__); "
                            "print(u.find_spec('tests'))"], cwd=work, env=env, check=True, capture_output=True,
                           text=True).stdout.split()
    assert where[0].startswith(str(tmp_path / "venv")) and where[1] == "None", where  # the wheel, not the checkout

    model = build_tiny_llama(tmp_path / "tiny-untied", base_model_dir, tie_embeddings=False)
    env.update({"FLYWHEEL_EMBED_MODEL": str(default_embedder_dir().resolve()), "FLYWHEEL_EPOCHS": "2", "FLYWHEEL_LEARNING_RATE": "5e-3",
                "FLYWHEEL_WARMUP_RATIO": "0", "FLYWHEEL_GATE_MIN_EVAL_ITEMS": "1",
                "FLYWHEEL_MIN_TRAIN_EXAMPLES": "2", "FLYWHEEL_GATE_MAX_LOSS_RATIO": "3.0",
                "FLYWHEEL_GATE_MARGIN": "-1", "FLYWHEEL_GATE_REGRESSION_TOLERANCE": "1"})
    run = subprocess.run([str(python), "-m", "flywheel", "demo", "run", "--facts", "3", "--paraphrases", "1",
                          "--model", str(model), "--output", "out"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    saved = json.loads((work / "out" / "results.json").read_text())
    assert saved["summary"]["asked"]["n"] == 3 and saved["version"]["name"]
    assert (work / "out" / "before_after.md").is_file()
