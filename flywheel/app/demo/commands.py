"""`flywheel demo run`: the whole loop on this machine, no Slack workspace and no GPU needed.

Real gateway, real bot and real trainer run as processes; Slack is the local double
(flywheel.app.demo.slack_double: it prints what the bot would post); a scripted team plays one week
(flywheel.app.demo.week). Everything it needs ships in the package, so it runs from an installed
wheel too."""
from __future__ import annotations

from pathlib import Path

import typer

from flywheel.app.demo.processes import ServiceError, stop_children_on_sigterm

demo_app = typer.Typer(help="Run the whole loop locally on embedded defaults.", no_args_is_help=True)


@demo_app.command("run")
def run(
    backend: str = typer.Option("transformers", envvar="FLYWHEEL_BACKEND", help="transformers or vllm"),
    output: Path = typer.Option(Path("demo-output"), help="Where the report, plot and tables go"),
    model: Path = typer.Option(Path("models/smollm2-135m-instruct"), envvar="FLYWHEEL_BASE_MODEL",
                               help="Base model directory"),
    facts: int = typer.Option(0, help="Use only the first N facts (0: all)"),
    facts_file: Path = typer.Option(None, "--facts-file", help='JSONL of {"question", "answer", "paraphrases": [...]} '
                                    "(default: the bundled fictional company)"),
    paraphrases: int = typer.Option(2, min=0, help="Paraphrases asked per fact (never taught)"),
    recheck: int = typer.Option(0, min=0, help="After the week, ask only a seeded sample of N facts (their "
                                "questions and paraphrases) through the bot again (0: all; for large fact sets)"),
    docs: Path = typer.Option(None, "--docs", help="The team's documents (a folder or file of Markdown, HTML, "
                              "text, PDF): imported before the week, then every question through the bot "
                              "before any correction (the docs phase)"),
    until: str = typer.Option(None, "--until", help="docs: stop after the docs phase (needs --docs); "
                              "default: the whole week"),
) -> None:
    """Play a week in a team workspace: ask, react, correct, train, gate, promote, ask again."""
    if backend not in ("transformers", "vllm"):
        typer.secho("error: --backend must be transformers or vllm", fg="red", err=True)
        raise typer.Exit(2)
    if until not in (None, "docs"):
        typer.secho("error: --until must be docs (or left out for the whole week)", fg="red", err=True)
        raise typer.Exit(2)
    if until == "docs" and docs is None:
        typer.secho("error: --until docs needs --docs DIR (the documents to import)", fg="red", err=True)
        raise typer.Exit(2)
    if docs is not None and not docs.exists():
        typer.secho(f"error: --docs {docs}: no such file or folder", fg="red", err=True)
        raise typer.Exit(2)
    if facts_file is not None:
        from flywheel.app.demo.script import FactsFileError, read_facts_file  # the demo's imports: ~1 s on every command

        try:
            read_facts_file(facts_file)
        except FactsFileError as exc:
            typer.secho(f"error: {exc}", fg="red", err=True)
            raise typer.Exit(2)
    if not (model / "flywheel-model.json").is_file():
        typer.secho(f"error: no model in {model}; run `make model` (or `flywheel model fetch`)", fg="red", err=True)
        raise typer.Exit(2)
    from flywheel.app.demo.week import DemoConfig, run_demo  # store, bot, trainer: ~1 s on every `flywheel` command

    stop_children_on_sigterm()  # a killed demo stops its gateway, bot and trainer too
    try:
        run_demo(DemoConfig(output=output, model_dir=model, backend=backend, facts=facts or None,
                            facts_file=facts_file, paraphrases=paraphrases,
                            recheck=recheck or None, docs=docs, until=until))
    except (ServiceError, TimeoutError, RuntimeError, ValueError) as exc:
        typer.secho(f"\ndemo failed: {exc}\n(service logs in {output / 'logs'})", fg="red", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.secho("\ndemo stopped; its services were stopped too", fg="yellow", err=True)
        raise typer.Exit(130)
