"""`flywheel bot …`: run the Slack bot, print its app manifest."""
from __future__ import annotations

import gc
from importlib import resources

import typer
from pydantic import ValidationError

bot_app = typer.Typer(help="The Slack bot: answers, feedback, admin commands.", no_args_is_help=True)


@bot_app.command()
def serve(
    port: int = typer.Option(3000, envvar="FLYWHEEL_BOT_PORT", help="HTTP port (/slack/events, /healthz, /metrics)"),
    host: str = typer.Option("127.0.0.1", envvar="FLYWHEEL_BOT_HOST", help="Interface to listen on"),
) -> None:
    """Serve the bot: Socket Mode when SLACK_APP_TOKEN is set, else the HTTP Events API."""
    import logging

    import uvicorn
    from slack_bolt.error import BoltError

    from bot.server import create_asgi
    from bot.settings import BotSettings

    try:
        settings = BotSettings()
        socket_mode = bool(settings.slack_app_token)
        asgi = create_asgi(settings, socket_mode=socket_mode)
    except (ValidationError, ValueError, BoltError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per gateway call is noise
    # Startup objects (libraries, the app) never die: keep them out of the garbage collector's
    # full collections, which otherwise stall every request in flight.
    gc.collect()
    gc.freeze()
    mode = "Socket Mode" if socket_mode else f"HTTP Events API at http://{host}:{port}/slack/events"
    typer.echo(f"Flywheel bot: {mode}; gateway {settings.gateway_url}")
    uvicorn.run(asgi, host=host, port=port, log_level="warning")


@bot_app.command()
def manifest() -> None:
    """Print the Slack app manifest (paste it at api.slack.com/apps → Create New App)."""
    typer.echo(resources.files("bot").joinpath("manifest.yaml").read_text())
