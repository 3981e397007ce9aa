"""Base models the way users name them (flywheel.basemodel): a folder or a Hugging Face Hub id at a
revision, found through huggingface_hub's real code and cache layout; their identity for
adapters; the dtype and quantization policy; the GPU checkpointing estimate.

Hub models come from a cache written here in huggingface_hub's layout (models--org--name/
blobs, snapshots/<commit>/, refs/<branch>), read offline: no test reaches the network."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from flywheel.adapters import AdapterError, adapter_digest, base_model_id
from flywheel.basemodel import (
    MARKER,
    ModelLoadError,
    folder_digest,
    load_causal_lm,
    parse_ref,
    quantization_config,
    resolve,
)
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from gateway.sync import Syncer, VersionInfo
from trainer.modeling import gpu_checkpoint_above, load_base_model, use_checkpointing

ROOT = Path(__file__).resolve().parents[1]
MAIN, V2 = "1" * 40, "2" * 40  # commits of acme/tiny-chat: main, and the tag v2 (other weights)


def hub_snapshot(cache: Path, repo_id: str, commit: str, source: Path, refs: tuple[str, ...] = ()) -> Path:
    """`source`'s files as the snapshot `commit` of `repo_id` in an HF cache: blobs, snapshot
    symlinks into them, refs naming the commit (the blobs link to the source: no copies)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != MARKER:  # a Hub repo has no Flywheel marker
            blob = hashlib.sha256(f"{path.resolve()}".encode()).hexdigest()
            if not (repo / "blobs" / blob).exists():
                (repo / "blobs" / blob).symlink_to(path.resolve())
            (snapshot / path.name).symlink_to(Path("../../blobs") / blob)
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def other_tiny(tiny_model_dir, tmp_path_factory):
    """Another tiny Llama: same architecture and folder name, other weights (seed 1)."""
    from flywheel.modelfiles import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("other") / "tiny-llama", tiny_model_dir, seed=1)


@pytest.fixture
def hf_home(tmp_path, tiny_model_dir, other_tiny):
    """An HF home whose cache holds acme/tiny-chat (main = the tiny model, v2 = the other one)."""
    home = tmp_path / "hf"
    hub_snapshot(home / "hub", "acme/tiny-chat", MAIN, tiny_model_dir, refs=("main",))
    hub_snapshot(home / "hub", "acme/tiny-chat", V2, other_tiny, refs=("v2",))
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch):
    """huggingface_hub in this process reading hf_home's cache offline (the values its
    HF_HUB_CACHE and HF_HUB_OFFLINE variables set when it is imported)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home


def embedder_dir() -> Path:
    from flywheel.memory import MemorySettings
    from flywheel.modelfiles import read_marker

    path = (ROOT / MemorySettings().embed_model).resolve()
    if read_marker(path) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{path} missing in CI; `make model` should have fetched it")
        pytest.skip("sentence embedder not fetched: run `make model`")
    return path


# ---- references --------------------------------------------------------------------------------
def test_a_reference_is_a_folder_or_a_hub_id(tiny_model_dir, tmp_path):
    assert parse_ref(tiny_model_dir).folder == tiny_model_dir
    assert parse_ref("Qwen/Qwen2.5-7B-Instruct") == parse_ref("Qwen/Qwen2.5-7B-Instruct@")
    pinned = parse_ref("Qwen/Qwen2.5-7B-Instruct@v1.0")
    assert (pinned.repo_id, pinned.revision, str(pinned)) == ("Qwen/Qwen2.5-7B-Instruct", "v1.0",
                                                              "Qwen/Qwen2.5-7B-Instruct@v1.0")
    for path in (str(tmp_path / "missing"), "./models/x", "~/models/x", "models/a/b"):
        assert parse_ref(path).folder is not None, path
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="neither a model folder nor a Hugging Face Hub id"):
        parse_ref("not an id!")


def test_a_hub_id_resolves_from_the_cache_offline(offline_cache):
    main = resolve("acme/tiny-chat")
    assert main.commit == MAIN and main.folder == offline_cache / "hub/models--acme--tiny-chat/snapshots" / MAIN
    assert resolve(f"acme/tiny-chat@{MAIN}").folder == main.folder
    assert resolve("acme/tiny-chat@v2").commit == V2


def test_offline_and_not_cached_says_how_to_get_it(offline_cache):
    with pytest.raises(ModelLoadError) as err:
        resolve("acme/unknown@v3")
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "flywheel model fetch --repo-id acme/unknown --revision v3" in message


def test_loading_never_forces_the_hub_offline(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = load_base_model(tiny_model_dir, torch.device("cpu"))
    assert model.dtype == torch.float32 and model.config.use_cache is False  # CPU: float32, as before
    assert "HF_HUB_OFFLINE" not in os.environ


LOADERS = r"""
import asyncio, json, sys
import torch
from flywheel.adapters import base_model_id
from flywheel.embedding import Embedder
from gateway.backends.transformers import TransformersBackend
from gateway.settings import GatewaySettings
from trainer.modeling import load_base_model, load_tokenizer

ref, embedder_ref = sys.argv[1], sys.argv[2]
tokenizer, model = load_tokenizer(ref), load_base_model(ref, torch.device("cpu"))
backend = TransformersBackend(GatewaySettings(base_model=ref, device="cpu"))
asyncio.run(backend.start())
asyncio.run(backend.close())
vector = Embedder(embedder_ref).embed_one("Where is the warehouse?")
print(json.dumps({"trainer": [str(model.dtype), model.config.hidden_size, tokenizer.pad_token is not None],
                  "gateway": [backend.ready, backend.model.config.hidden_size, backend.context_len],
                  "embedder": len(vector), "identity": base_model_id(ref)}))
"""


def test_trainer_gateway_and_embedder_load_hub_ids_from_the_cache_with_hf_hub_offline(hf_home, tiny_model_dir):
    """The real environment variables in a fresh process, as a deployment sets them."""
    hub_snapshot(hf_home / "hub", "acme/mini-embedder", "3" * 40, embedder_dir(), refs=("main",))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run([sys.executable, "-c", LOADERS, "acme/tiny-chat", "acme/mini-embedder"], cwd=ROOT, check=False,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    hidden = json.loads((tiny_model_dir / "config.json").read_text())["hidden_size"]
    assert out["trainer"] == ["torch.float32", hidden, True]
    assert out["gateway"] == [True, hidden, 2048]
    assert out["embedder"] == 384
    assert out["identity"] == f"acme/tiny-chat@{MAIN}"


# ---- identity ----------------------------------------------------------------------------------
def test_the_same_weights_under_two_paths_are_one_base(tiny_model_dir, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "renamed")
    (copy / "config.json").write_text(json.dumps({**json.loads((copy / "config.json").read_text()),
                                                  "_name_or_path": str(copy)}, indent=4))
    assert base_model_id(copy) == base_model_id(tiny_model_dir)
    assert base_model_id(copy).startswith("sha256:")


def test_two_models_in_folders_of_one_name_are_two_bases(tiny_model_dir, other_tiny):
    assert tiny_model_dir.name == other_tiny.name
    assert base_model_id(other_tiny) != base_model_id(tiny_model_dir)


def test_one_changed_tensor_changes_the_identity(tiny_model_dir, tmp_path):
    """Same config, same header: only the final norm differs (a sample per tensor sees it)."""
    changed = shutil.copytree(tiny_model_dir, tmp_path / "tiny-llama")
    weights = load_file(changed / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    assert folder_digest(changed) != folder_digest(tiny_model_dir)


def test_a_revision_is_part_of_a_hub_models_identity(offline_cache):
    assert base_model_id("acme/tiny-chat") == f"acme/tiny-chat@{MAIN}" == base_model_id(f"acme/tiny-chat@{MAIN}")
    assert base_model_id("acme/tiny-chat@v2") == f"acme/tiny-chat@{V2}"


def test_adapters_registered_by_folder_name_still_load_on_that_folder_and_nowhere_else(
        tiny_model_dir, other_tiny, offline_cache, tmp_path):
    """Registered before identities: base "tiny-llama" (the folder-name rule: the marker's name,
    else the folder's). A gateway on a folder of that name loads them (with a warning); one on
    another folder or on a Hub model refuses them, and new identities never mix."""
    adapters = tmp_path / "adapters"
    (adapters / "ft-0001").mkdir(parents=True)
    (adapters / "ft-0001" / "adapter_config.json").write_text("{}")
    (adapters / "ft-0001" / "adapter_model.safetensors").write_bytes(b"weights")
    digest = adapter_digest(adapters / "ft-0001")
    renamed = shutil.copytree(tiny_model_dir, tmp_path / "renamed", ignore=shutil.ignore_patterns(MARKER))

    class Recorder:
        def __init__(self):
            self.loaded = []

        async def load_adapter(self, name, path):
            self.loaded.append(name)

        async def generate(self, version, endpoint, req):
            return {}

    def load(base, registered: str) -> list[str]:
        gateway = Gateway(GatewaySettings(base_model=base, adapters_dir=adapters, device="cpu"))
        gateway.backend = Recorder()
        info = VersionInfo("ft-0001", str(adapters / "ft-0001"), digest, registered)
        asyncio.run(Syncer(gateway)._load("ft-0001", info))
        return gateway.backend.loaded

    assert load(tiny_model_dir, "tiny-llama") == ["ft-0001"]
    assert load(renamed, "renamed") == ["ft-0001"]
    assert load(renamed, base_model_id(tiny_model_dir)) == ["ft-0001"]  # same weights, another path
    for base, registered in ((renamed, "tiny-llama"), ("acme/tiny-chat", "tiny-chat"),
                             (other_tiny, base_model_id(tiny_model_dir)),
                             ("acme/tiny-chat@v2", base_model_id("acme/tiny-chat"))):
        with pytest.raises(AdapterError, match="was trained on base model"):
            load(base, registered)


# ---- dtype, quantization, checkpointing -------------------------------------------------------
def test_4bit_on_a_cpu_is_refused_before_anything_loads(tiny_model_dir):
    for load in (lambda: load_causal_lm(tiny_model_dir, "cpu", "4bit"),
                 lambda: load_base_model(tiny_model_dir, torch.device("cpu"), "4bit")):
        with pytest.raises(ModelLoadError, match="FLYWHEEL_QUANTIZE=4bit needs a CUDA GPU"):
            load()
    with pytest.raises(ModelLoadError, match="only choice is 4bit"):
        quantization_config("8bit", "cuda")


def test_4bit_without_bitsandbytes_says_how_to_install_it():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed here")
    except ImportError:
        pass
    with pytest.raises(ModelLoadError, match=r"pip install 'flywheel\[gpu\]'"):
        quantization_config("4bit", "cuda")  # torch.device("cuda") needs no GPU to exist


QWEN_7B = SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, vocab_size=152064)


def test_gpu_checkpointing_follows_the_free_memory():
    gib = 2 ** 30
    lora = 40_000_000
    roomy = gpu_checkpoint_above(QWEN_7B, 2, free_bytes=125 * gib, total_bytes=141 * gib, trainable_params=lora)
    tight = gpu_checkpoint_above(QWEN_7B, 2, free_bytes=18 * gib, total_bytes=24 * gib, trainable_params=lora)
    assert roomy > 8 * 1024 > tight > 512  # an H200 with a bf16 7B: 8 x 1024 tokens without recomputing
    assert gpu_checkpoint_above(QWEN_7B, 2, free_bytes=2 * gib, total_bytes=24 * gib, trainable_params=lora) == 0
    assert use_checkpointing(torch.device("cuda"), None) is None  # decided per micro-batch from that limit
    assert use_checkpointing(torch.device("cpu"), None) is None  # CPU: checkpoint_above_tokens, as before
    assert use_checkpointing(torch.device("mps"), None) is False
    assert use_checkpointing(torch.device("cuda"), True) is True


# ---- fetching and serving by Hub id -----------------------------------------------------------
def test_model_fetch_by_repo_id_uses_the_cache(offline_cache):
    from flywheel.app.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["model", "fetch", "--repo-id", "acme/tiny-chat", "--revision", "v2"])
    assert done.exit_code == 0, done.output
    assert f"acme/tiny-chat@{V2}" in done.output
    missing = runner.invoke(app, ["model", "fetch", "--repo-id", "acme/absent"])
    assert missing.exit_code == 2 and "HF_HUB_OFFLINE" in missing.output
    assert runner.invoke(app, ["model", "fetch", "--revision", "v2"]).exit_code == 2


def test_vllm_gets_a_hub_id_and_its_revision(tiny_model_dir, monkeypatch):
    from gateway.vllm_server import VLLMServer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub = VLLMServer("Qwen/Qwen2.5-7B-Instruct@v1.0", port=1)
    folder = VLLMServer(tiny_model_dir, port=1)
    try:
        model = hub.args[hub.args.index("--model") + 1:hub.args.index("--model") + 4]
        assert model == ["Qwen/Qwen2.5-7B-Instruct", "--revision", "v1.0"]
        assert hub.served_name == "Qwen/Qwen2.5-7B-Instruct" and "HF_HUB_OFFLINE" not in hub.env
        assert folder.args[folder.args.index("--model") + 1] == str(tiny_model_dir)
        assert "--revision" not in folder.args and folder.env["HF_HUB_OFFLINE"] == "1"
    finally:
        hub.cleanup()
        folder.cleanup()
