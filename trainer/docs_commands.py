"""`flywheel docs import | list | remove`: the team's documents as a source (issue 28)."""
from __future__ import annotations

import typer
from pydantic import ValidationError

from store.db import session_scope
from store.documents import list_documents, remove_document
from store.errors import StoreError

docs_app = typer.Typer(help="Import the team's documents (Markdown, HTML, text, PDF; files, folders, URLs): "
                            "their sections answer as notes.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


@docs_app.command("import")
def import_cmd(
    inputs: list[str] = typer.Argument(..., help="files, folders (recursively) or http(s) URLs"),
    channel: str | None = typer.Option(None, "--channel", help="visible only in this Slack channel (id); "
                                       "default: everywhere"),
    by: str | None = typer.Option(None, "--by", help="who imports (a Slack user id), recorded on the document"),
) -> None:
    """Import (or re-import) documents: changed sections are updated, vanished ones retired,
    unchanged ones kept. Every source is read before anything is stored."""
    # deferred: the parsers, httpx and the memory add ~1.0 s to every `flywheel` command (3.0 -> 4.0 s
    # importing the CLI's modules, measured on the 2-core EPYC)
    import httpx

    from flywheel.embedding import EmbedderError
    from flywheel.memory import Memory, MemorySettings
    from trainer.docsource import DocumentError, DocumentSettings, collect
    from trainer.documents import import_document

    try:
        settings, memory_settings = DocumentSettings(), MemorySettings()
    except ValidationError as exc:
        _fail(f"bad settings: {exc}")
    if not memory_settings.memory:
        _fail("the memory is off (FLYWHEEL_MEMORY=0): imported sections would answer nothing")
    memory = Memory(memory_settings)
    try:
        with httpx.Client() as client:
            sources = collect(inputs, settings, client)
        with session_scope() as s:
            for source in sources:
                done = import_document(s, memory, source, section_chars=settings.docs_section_chars,
                                       visible_in=channel, imported_by=by)
                redacted = sum(done.redactions.values())
                typer.echo(f"{done.document.id}: {done.document.title} ({source.source}) v{done.document.version}: "
                           f"{done.sections} sections, {done.new} new, {done.changed} changed, "
                           f"{done.unchanged} unchanged, {done.retired} retired"
                           + (f", {redacted} redactions" if redacted else ""))
    except (DocumentError, StoreError, EmbedderError) as exc:
        _fail(str(exc))


@docs_app.command("list")
def list_cmd() -> None:
    """Imported documents: id, title, sections, version, where visible, source."""
    with session_scope() as s:
        rows = list_documents(s)
    if not rows:
        typer.echo("no documents imported yet (`flywheel docs import PATH|URL`)")
        return
    for doc, sections in rows:
        where = "everywhere" if doc.visible_in is None else f"only in {doc.visible_in}"
        typer.echo(f"{doc.id}\t{doc.title}\t{sections} sections\tv{doc.version}\t{where}\t"
                   f"{doc.updated_at:%Y-%m-%d}\t{doc.source}")


@docs_app.command("remove")
def remove_cmd(document_id: int = typer.Argument(..., help="the id `flywheel docs list` shows")) -> None:
    """Remove a document: its sections stop answering at once."""
    try:
        with session_scope() as s:
            doc = remove_document(s, document_id)
    except StoreError as exc:
        _fail(str(exc))
    typer.echo(f"removed {doc.id}: {doc.title} ({doc.source})")
