"""`flywheel up`: run the real services on one machine (gateway, bot in Socket Mode, trainer
daemon) against a real Slack workspace; stop them all when one dies or on Ctrl-C."""
from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from flywheel.app.demo.processes import Service, ServiceError, run_flywheel, stop_children_on_sigterm

REQUIRED = ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN")


def up(
    port: int = typer.Option(8000, help="Gateway port"),
    logs: Path = typer.Option(Path("logs"), help="Folder for the services' logs"),
) -> None:
    """Start gateway + bot (Socket Mode) + trainer watch; needs Slack tokens in the environment."""
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        typer.secho(f"error: {', '.join(missing)} not set. Install the app from bot/manifest.yaml "
                    "(see README), export its tokens, and try again; `make demo` runs without Slack.",
                    fg="red", err=True)
        raise typer.Exit(2)
    if run_flywheel(["db", "upgrade"], {}) != 0:
        raise typer.Exit(1)
    gateway_url = f"http://127.0.0.1:{port}"
    env = {"FLYWHEEL_GATEWAY_URL": os.environ.get("FLYWHEEL_GATEWAY_URL", gateway_url)}
    stop_children_on_sigterm()
    services = [
        Service("gateway", ["gateway", "serve", "--host", "127.0.0.1", "--port", str(port)], env,
                logs / "gateway.log", ready_url=f"{gateway_url}/readyz"),
        Service("bot", ["bot", "serve"], env, logs / "bot.log"),
        Service("trainer", ["train", "watch"], env, logs / "trainer.log"),
    ]
    try:
        for svc in services:
            typer.echo(f"starting {svc.name} (log: {svc.log_path})")
            svc.start()
            svc.wait_ready(progress=typer.echo)
        typer.echo("all services running; Ctrl-C stops them")
        while all(svc.proc.poll() is None for svc in services):
            time.sleep(1)
        dead = next(svc for svc in services if svc.proc.poll() is not None)
        raise ServiceError(f"{dead.name} exited with code {dead.proc.returncode}:\n{dead.log_tail()}")
    except ServiceError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("stopping…")
    finally:
        for svc in reversed(services):
            svc.stop()
