"""The base model, one way for everyone: what a reference names (a local folder, or a Hugging Face
Hub id at an optional revision, `org/name@revision`), where its files are (resolved through
huggingface_hub and its cache), what it is (the identity adapters are registered against), and
its tokenizer and causal LM loaded with one dtype policy. The trainer, the gateway's transformers
backend, the demo and the memory's embedder all find and load models here.

huggingface_hub's own settings are honoured and never forced: HF_TOKEN (private and gated
models), HF_HOME / HF_HUB_CACHE (where downloads go), HF_HUB_OFFLINE (the cache only)."""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKER = "flywheel-model.json"  # written by flywheel.modelfiles; its name was the old identity
# What a model needs besides its weights: config, tokenizer files, chat template.
META_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Bytes read from the middle of each tensor for a folder's identity: enough to tell two trainings
# of one architecture apart, little enough to identify a 15 GB checkpoint in well under a second.
TENSOR_SAMPLE = 4096
FILE_SAMPLE = 1 << 16  # per sample, three samples, for weights that are not safetensors
# Config keys save_pretrained stamps with the path and the tool, not the model.
VOLATILE_CONFIG = ("_name_or_path", "transformers_version")
QUANTIZE_CHOICES = ("4bit",)

Progress = Callable[[str], object]


class ModelLoadError(RuntimeError):
    """A base model cannot be found, fetched or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelRef:
    """A folder, or a Hub repo at a revision (a branch, tag or commit; None: the default branch)."""

    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)


@dataclass(frozen=True)
class Identity:
    """What a base model is, for adapters: `org/name@<commit>` for a Hub model, `sha256:<hex>` of
    config and weight structure for a folder (the same weights under two paths are one base).
    `legacy` is the name the folder-name rule gave a folder before identities existed."""

    id: str
    legacy: str | None = None

    def accepts(self, registered: str) -> bool:
        """Whether an adapter registered with base `registered` belongs to this base: its
        identity, or for adapters registered before identities the folder-name rule's name."""
        return registered == self.id or (self.legacy is not None and registered == self.legacy)


@dataclass(frozen=True)
class ResolvedModel:
    """A reference and the local folder that holds its files (for a Hub model, a snapshot folder)."""

    ref: ModelRef
    folder: Path
    commit: str | None = None  # the Hub commit the snapshot is; None for a folder

    @property
    def identity(self) -> Identity:
        if self.ref.repo_id is not None:
            return Identity(f"{self.ref.repo_id}@{self.commit}")
        return Identity(f"sha256:{folder_digest(self.folder)[:32]}", legacy=_folder_name(self.folder))


def parse_ref(reference: str | Path) -> ModelRef:
    """A folder when one exists there or the text can only be a path (absolute, ./, ~, more
    than one /); otherwise a Hub id, `org/name` or `org/name@revision`."""
    # huggingface_hub.utils: ~0.15 s to import, and the bot imports this module without a model
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(reference).strip()
    folder = Path(text).expanduser()
    if folder.is_dir() or folder.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        return ModelRef(folder=folder)
    repo_id, _, revision = text.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ModelLoadError(f"{text!r} is neither a model folder nor a Hugging Face Hub id "
                             f"(org/name or org/name@revision): {exc}") from exc
    return ModelRef(repo_id=repo_id, revision=revision or None)


def resolve(reference: str | Path, *, weights: bool = True) -> ResolvedModel:
    """The local folder of a model, downloading what is missing from a Hub model (or finding it
    in the cache); `weights=False` gets config and tokenizer files only (naming, tokenizing)."""
    ref = parse_ref(reference)
    if ref.folder is not None:
        return ResolvedModel(ref, _checked_folder(ref, ref.folder, weights))
    folder, commit = _hub_files(ref, weights)
    return ResolvedModel(ref, _checked_folder(ref, folder, weights), commit)


def fetch(repo_id: str, revision: str | None, target: Path | None, progress: Progress = print) -> ResolvedModel:
    """Download a Hub model (with huggingface_hub's progress bars) into the HF cache, or into
    `target` as a plain folder. Idempotent: files already there are not fetched again."""
    ref = parse_ref(f"{repo_id}@{revision}" if revision else repo_id)
    if ref.repo_id is None:
        raise ModelLoadError(f"--repo-id {repo_id!r} is not a Hugging Face Hub id (org/name)")
    progress(f"Fetching {ref} from the Hugging Face Hub into {target or 'the Hugging Face cache'}...")
    if target is None:
        model = resolve(str(ref))
    else:
        folder, commit = _hub_files(ref, True, local_dir=Path(target))
        model = ResolvedModel(ModelRef(folder=folder), _checked_folder(ref, folder, True))
        progress(f"{ref} is commit {commit}.")
    progress(f"Ready in {model.folder} (base model identity {model.identity.id}).")
    return model


def _hub_files(ref: ModelRef, weights: bool, local_dir: Path | None = None) -> tuple[Path, str]:
    """(folder, commit) of a Hub model: config and tokenizer files first, then, pinned to the
    commit they came from, the weight files its index names (or model.safetensors), so other
    formats and duplicate checkpoints in the repo (consolidated.*, onnx/, original/) are skipped."""
    meta = _snapshot(ref, ref.revision, META_PATTERNS)
    commit = meta.name  # the cache's snapshots/<commit>
    weight_names = (weight_files(meta) or ["model.safetensors"]) if weights else []
    if local_dir is None and all((meta / name).is_file() for name in weight_names):
        return meta, commit  # all cached (without a network that is not HF_HUB_OFFLINE, asking costs retries)
    return _snapshot(ref, commit, META_PATTERNS + weight_names, local_dir), commit


def _snapshot(ref: ModelRef, revision: str | None, patterns: list[str], local_dir: Path | None = None) -> Path:
    """snapshot_download with its errors turned into what to do about them."""
    # huggingface_hub's download code: ~0.4 s to import (hf_api, httpx); the bot imports this module
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=patterns, local_dir=local_dir))
    except GatedRepoError as exc:
        raise ModelLoadError(f"{ref.repo_id} is gated on the Hugging Face Hub: accept its terms on "
                             f"https://huggingface.co/{ref.repo_id} and set HF_TOKEN") from exc
    except RepositoryNotFoundError as exc:
        raise ModelLoadError(f"{ref}: no such folder here, and no model {ref.repo_id} on the Hugging Face Hub "
                             "(a private one needs HF_TOKEN); run `make model` for the defaults, or name a "
                             "model folder or a Hub id such as Qwen/Qwen2.5-7B-Instruct") from exc
    except RevisionNotFoundError as exc:
        raise ModelLoadError(f"{ref.repo_id} has no revision {revision!r} on the Hugging Face Hub") from exc
    except LocalEntryNotFoundError as exc:
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        folder_hint = "or name a model folder (`make model` fetches the default ones)"
        if constants.HF_HUB_OFFLINE:
            pinned = f" --revision {revision}" if revision else ""
            raise ModelLoadError(
                f"{ref}: no such folder here, and not in {where} while HF_HUB_OFFLINE is set: fetch it once "
                f"online (`flywheel model fetch --repo-id {ref.repo_id}{pinned}`), point HF_HUB_CACHE at a "
                f"cache that has it, {folder_hint}") from exc
        raise ModelLoadError(f"{ref}: no such folder here, not in {where}, and the Hugging Face Hub could not "
                             f"be reached ({exc}); check the network, {folder_hint}") from exc


def _checked_folder(ref: ModelRef, folder: Path, weights: bool) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"base model {ref} not found: {folder} has no config.json; run `make model`, "
                             "or name a model folder (transformers format) or a Hub id such as "
                             "Qwen/Qwen2.5-7B-Instruct")
    if weights and not weight_files(folder):
        raise ModelLoadError(f"{ref}: {folder} holds no model weights (model.safetensors, or shards named by "
                             "model.safetensors.index.json); a Hub model needs safetensors weights")
    return folder


def weight_files(folder: Path) -> list[str]:
    """The weight files of a model folder: the shards its index names, else its single file
    (only those that exist; the index alone is enough to list a Hub model's shards)."""
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            return sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
    return [name for name in SINGLE_WEIGHTS if (folder / name).is_file()][:1]


def folder_digest(folder: Path) -> str:
    """sha256 over what makes a model, never over a path: its config (less the path and tool
    stamps), its weight index, and per weight file the name, size, safetensors header (names,
    dtypes, shapes, offsets) and a sample from the middle of every tensor."""
    digest = hashlib.sha256()
    config = json.loads((folder / "config.json").read_text())
    for key in VOLATILE_CONFIG:
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text())["weight_map"]
            digest.update(json.dumps(weight_map, sort_keys=True).encode())
    names = weight_files(folder)
    if not names:
        raise ModelLoadError(f"{folder} holds no model weights to identify it by")
    for name in names:
        path = folder / name
        if not path.is_file():
            raise ModelLoadError(f"{folder} lacks {name}, which its weight index names: an incomplete download?")
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            _digest_weights(fh, name, path.stat().st_size, digest)
    return digest.hexdigest()


def _digest_weights(fh, name: str, size: int, digest) -> None:
    if not name.endswith(".safetensors"):
        for start in (0, max(0, size // 2 - FILE_SAMPLE // 2), max(0, size - FILE_SAMPLE)):
            fh.seek(start)
            digest.update(fh.read(FILE_SAMPLE))
        return
    (header_len,) = struct.unpack("<Q", fh.read(8))
    header = fh.read(header_len)
    digest.update(header)
    tensors = [t for key, t in json.loads(header).items() if key != "__metadata__"]
    for begin, end in sorted(t["data_offsets"] for t in tensors):
        length = min(TENSOR_SAMPLE, end - begin)
        fh.seek(8 + header_len + begin + (end - begin - length) // 2)
        digest.update(fh.read(length))


def _folder_name(folder: Path) -> str:
    """The old rule's name: the flywheel marker's model name, else the folder's name."""
    try:
        name = json.loads((folder / MARKER).read_text()).get("name")
    except (OSError, ValueError):
        name = None
    return name or folder.resolve().name


# ---- loading ----------------------------------------------------------------------------------
def weights_dtype(device):
    """The one dtype policy: bf16 weights on a CUDA GPU that has bf16, float32 everywhere else
    (LoRA on CPU wants float32 weights; bf16 on CPU is opt-in autocast, flywheel.precision)."""
    # torch: ~2 s to import here; the bot imports this module without loading a model
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(quantize: str | None, device):
    """bitsandbytes NF4 (QLoRA: bf16 compute, double quantization) for quantize="4bit", None for
    None; refused with what to do on a CPU and without bitsandbytes, before anything is loaded."""
    import torch  # ~2 s to import (see weights_dtype)

    if quantize is None:
        return None
    if quantize not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"FLYWHEEL_QUANTIZE={quantize!r}: the only choice is 4bit (or unset)")
    device = torch.device(device)
    if device.type != "cuda":
        raise ModelLoadError(f"FLYWHEEL_QUANTIZE=4bit needs a CUDA GPU (bitsandbytes NF4), but this process "
                             f"runs on {device.type}: unset FLYWHEEL_QUANTIZE, or run it on a GPU")
    try:
        import bitsandbytes  # noqa: F401 - optional (extra `gpu`): only checked for here
    except ImportError as exc:
        raise ModelLoadError("FLYWHEEL_QUANTIZE=4bit needs bitsandbytes: pip install 'flywheel[gpu]' "
                             "(or pip install bitsandbytes), or unset FLYWHEEL_QUANTIZE") from exc
    from transformers import BitsAndBytesConfig  # ~4 s to import (see load_causal_lm)

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=True)


def load_tokenizer(reference: str | Path):
    """The model's tokenizer, padding with EOS when it has no pad token (config and tokenizer
    files only: a Hub model's weights are not fetched for this)."""
    # transformers: ~4 s to import here; the bot imports this module without loading a model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve(reference, weights=False).folder, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(reference: str | Path, device, quantize: str | None = None):
    """The causal LM on `device` in weights_dtype, or NF4-quantized on a GPU with quantize="4bit"
    (checked before anything is downloaded or loaded)."""
    # torch, transformers: ~2 and ~4 s to import here; the bot imports this module without a model
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    quantization = quantization_config(quantize, device)
    folder = resolve(reference).folder
    if quantization is None:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=weights_dtype(device),
                                                    local_files_only=True).to(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quantization,
                                                device_map={"": index}, local_files_only=True)
