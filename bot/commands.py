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
    fd: int = typer.Option(None, help="Serve on this inherited, already-bound socket instead of host/port"),
) -> None:
    """Serve the bot: Socket Mode when SLACK_APP_TOKEN is set, else the HTTP Events API."""
    import logging
    import socket

    from bot.settings import BotSettings

    try:
        settings = BotSettings()
        socket_mode = bool(settings.slack_app_token)
        split = not socket_mode and settings.bot_ack_process and hasattr(socket, "AF_UNIX")
        if split:
            settings.require_http_credentials()  # the worker would say so too, but later
    except (ValidationError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    where = f"http://{host}:{port}" if fd is None else f"the socket of descriptor {fd}"
    if split:
        typer.echo(f"Flywheel bot: HTTP Events API at {where}/slack/events, acked by a front process, "
                   f"the bot in a worker behind it; gateway {settings.gateway_url}")
        _become_front(host, port, fd)

    import uvicorn
    from slack_bolt.error import BoltError

    from bot.server import create_asgi

    try:
        asgi = create_asgi(settings, socket_mode=socket_mode)
    except (ValidationError, ValueError, BoltError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per gateway call is noise
    # Startup objects (libraries, the app) never die: keep them out of the garbage collector's
    # full collections, which otherwise stall every request in flight.
    gc.collect()
    gc.freeze()
    mode = "Socket Mode" if socket_mode else f"HTTP Events API at {where}/slack/events"
    typer.echo(f"Flywheel bot: {mode}; gateway {settings.gateway_url}")
    uvicorn.run(asgi, host=host, port=port, fd=fd, log_level="warning")


def _become_front(host: str, port: int, fd: int | None) -> None:
    """Replace this process (same pid, so signals and supervisors still reach it) with the lean
    ack front, `python -m bot.front`: a fresh interpreter that never imports what the CLI loaded
    (SQLAlchemy, alembic, ...). The front starts `flywheel bot worker` itself."""
    import logging
    import os
    import sys

    os.environ["FLYWHEEL_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().level)  # --log-level
    sys.stdout.flush()
    sys.stderr.flush()
    where = ["--host", host, "--port", str(port)] + (["--fd", str(fd)] if fd is not None else [])
    os.execv(sys.executable, [sys.executable, "-m", "bot.front", *where])


@bot_app.command(hidden=True)
def worker(
    uds: str = typer.Option(..., help="Unix socket to serve HTTP on"),
    lifeline_fd: int = typer.Option(-1, help="Stop when this pipe closes (the front holds its other end)"),
) -> None:
    """The bot behind the ack front (bot/front.py starts it): Bolt, the listeners, the store and
    the gateway client, serving the app of bot/server.py on a Unix socket."""
    import logging

    import uvicorn
    from slack_bolt.error import BoltError

    from bot.server import create_asgi
    from bot.settings import BotSettings

    if lifeline_fd >= 0:
        _stop_with_front(lifeline_fd, uds)
    try:
        asgi = create_asgi(BotSettings())
    except (ValidationError, ValueError, BoltError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    gc.collect()
    gc.freeze()
    # Idle connections are closed by the front's client (15 s) before the server would (75 s):
    # a request never meets a connection the worker is closing.
    uvicorn.run(asgi, uds=uds, log_level="warning", timeout_keep_alive=75)


def _stop_with_front(fd: int, uds: str) -> None:
    """A thread that waits for the front's end of the pipe to close (the front stopped, however
    it stopped) and then stops this worker as SIGTERM would. Its stderr went to the front, which
    is gone: it goes nowhere from then on (a write to the broken pipe would fail the shutdown),
    and so does the socket's private directory, which the front can no longer remove."""
    import contextlib
    import os
    import signal
    import threading

    def wait() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        with contextlib.suppress(OSError):
            os.unlink(uds)
            os.rmdir(os.path.dirname(uds))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="bot-front-lifeline", daemon=True).start()


@bot_app.command()
def manifest() -> None:
    """Print the Slack app manifest (paste it at api.slack.com/apps → Create New App)."""
    typer.echo(resources.files("bot").joinpath("manifest.yaml").read_text())
