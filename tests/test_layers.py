"""The layering, enforced: flywheel/app (CLI, `up`, demo) on top; bot/, gateway/ and trainer/ beside
each other (they meet through the store and the gateway's HTTP API); the correction memory; store/;
the shared base (the rest of flywheel/) under everything. The contract lives in pyproject.toml
([tool.importlinter]) and is checked by import-linter on the real import graph."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--config", str(config), "--no-cache"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_the_layers_hold():
    run = _lint(ROOT / "pyproject.toml")
    assert run.returncode == 0 and "1 kept, 0 broken" in run.stdout, run.stdout[-3000:]


def test_every_shared_module_is_in_the_base_layer():
    """A new module in flywheel/ must be placed in a layer, or the contract would not see it."""
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    base = {name.strip() for name in layers[-1].split(":")}
    modules = {f"flywheel.{p.stem}" for p in (ROOT / "flywheel").glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert modules - {"flywheel.memory"} == base


def test_the_check_catches_an_upside_down_import(tmp_path):
    """The same tool on the same code with the order reversed must report broken contracts: the
    store would then sit above the app, and the app imports the store."""
    config = tmp_path / "upside_down.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["flywheel", "store"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "upside down"\ntype = "layers"\n'
                      'layers = ["store", "flywheel.app"]\n')
    run = _lint(config)
    assert run.returncode != 0 and "BROKEN" in run.stdout.upper(), run.stdout[-2000:]
