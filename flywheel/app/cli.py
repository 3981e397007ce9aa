"""The `flywheel` command: each package contributes its own sub-commands."""
from __future__ import annotations

import importlib

import typer

from flywheel.logs import configure_logging

app = typer.Typer(help="Flywheel: a Slack bot that learns from feedback.", no_args_is_help=True)

# (module, attribute, sub-command name). Imported lazily so `flywheel db` never loads torch.
SUBCOMMANDS = [
    ("store.commands", "db_app", "db"),
    ("flywheel.app.model_commands", "model_app", "model"),
    ("gateway.commands", "gateway_app", "gateway"),
    ("trainer.commands", "train_app", "train"),
    ("trainer.commands", "dataset_app", "dataset"),
    ("trainer.docs_commands", "docs_app", "docs"),
    ("bot.commands", "bot_app", "bot"),
    ("flywheel.app.demo.commands", "demo_app", "demo"),
]

for module_name, attr, name in SUBCOMMANDS:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # a real missing dependency, not a package still to come
            raise
        continue
    app.add_typer(getattr(module, attr), name=name)


from flywheel.app.up import up  # noqa: E402

app.command("up")(up)


@app.callback()
def main(log_level: str = typer.Option("INFO", envvar="FLYWHEEL_LOG_LEVEL", help="Log level")) -> None:
    configure_logging(log_level)


from flywheel.app.admin_commands import promote, review_app, rollback, versions  # noqa: E402

app.command("versions")(versions)
app.command("promote")(promote)
app.command("rollback")(rollback)
app.add_typer(review_app, name="review")
