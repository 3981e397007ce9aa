"""`flywheel gateway ...`: run the OpenAI-compatible gateway."""
from __future__ import annotations

import ipaddress
import socket

import typer

gateway_app = typer.Typer(help="The OpenAI-compatible model gateway.", no_args_is_help=True)


@gateway_app.callback()
def _group() -> None:
    """The OpenAI-compatible model gateway."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_error(host: str, api_keys: list[str], insecure: bool = False) -> str | None:
    """Why serving on `host` would be unsafe (None when it is fine): an address other machines can
    reach needs FLYWHEEL_API_KEYS, unless the operator says --insecure."""
    if api_keys or insecure or _is_loopback(host):
        return None
    return (f"refusing to serve on {host} without FLYWHEEL_API_KEYS: anyone who can reach it could use the "
            "model. Set FLYWHEEL_API_KEYS (comma-separated), bind to 127.0.0.1, or pass --insecure.")


def _bound_host(fd: int) -> str:
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockname()[0]
    finally:
        sock.detach()  # the server uses this descriptor; only its address was wanted


@gateway_app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on"),
    port: int = typer.Option(8000, help="Port to listen on"),
    fd: int = typer.Option(None, help="Serve on this inherited, already-bound socket instead of host/port"),
    backend: str = typer.Option(None, help="transformers or vllm (default: FLYWHEEL_BACKEND)"),
    base_model: str = typer.Option(None, help="Base model: a folder or a Hub id, org/name[@revision] "
                                              "(default: FLYWHEEL_BASE_MODEL)"),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="Serve on a non-loopback address without FLYWHEEL_API_KEYS"),
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /healthz, /readyz, /metrics."""
    import uvicorn
    from pydantic import ValidationError

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    overrides = {k: v for k, v in {"backend": backend, "base_model": base_model}.items() if v}
    try:
        settings = GatewaySettings(**overrides)
    except ValidationError as exc:
        typer.echo(f"invalid gateway settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    if settings.backend == "vllm" and not settings.vllm_urls:
        typer.echo("FLYWHEEL_BACKEND=vllm needs FLYWHEEL_VLLM_URLS (comma-separated vLLM server URLs)", err=True)
        raise typer.Exit(2)
    problem = exposure_error(_bound_host(fd) if fd is not None else host, settings.api_keys, insecure)
    if problem:
        typer.echo(problem, err=True)
        raise typer.Exit(2)
    uvicorn.run(create_app(settings), host=host, port=port, fd=fd, log_level="warning", access_log=False)


@gateway_app.command("vllm-server")
def vllm_server(
    model: str = typer.Option(..., help="Model for vLLM to serve: a folder (transformers format) or a "
                                        "Hugging Face Hub id, org/name[@revision]"),
    port: int = typer.Option(8001, help="Port on 127.0.0.1"),
    max_loras: int = typer.Option(2, help="Adapters vLLM batches at once (keep >= 2 for hot-swap)"),
    max_model_len: int = typer.Option(1024, help="Context length"),
) -> None:
    """Run a local vLLM OpenAI server with runtime LoRA loading (the `make vllm` venv), until Ctrl-C."""
    from gateway.vllm_server import VLLMServer, VLLMServerError

    server = VLLMServer(model, port=port, max_loras=max_loras, max_model_len=max_model_len)
    try:
        server.start()
    except VLLMServerError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"vLLM serving {model} at {server.url} (log: {server.logfile}); "
               f"use FLYWHEEL_BACKEND=vllm FLYWHEEL_VLLM_URLS={server.url}")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.cleanup()
