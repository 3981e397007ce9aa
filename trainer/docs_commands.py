"""`flywheel docs import | list | remove`: the team's documents as a source (issue 28);
`flywheel docs questions [--generate] | approve | approve-question | reject-question`: questions
generated from their sections, reviewed before they train (trainer/docquestions.py)."""
from __future__ import annotations

import typer
from pydantic import ValidationError
from sqlmodel import Session

from store.audit import cli_actor
from store.db import session_scope
from store.docquestions import (
    QuestionReport,
    approve_document,
    decide_question,
    memory_item,
    pending_questions,
    question_report,
    with_sections,
)
from store.documents import get_document, list_documents, remove_document
from store.errors import StoreError
from store.models import DocQuestion, Document

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


ACTOR_HELP = "Who the audit log names (default: cli:<login>)"


def _document_settings():
    # deferred: trainer.docsource imports httpx (see import_cmd)
    from trainer.docsource import DocumentSettings

    try:
        return DocumentSettings()
    except ValidationError as exc:
        _fail(f"bad settings: {exc}")


def _documents(session: Session, document_id: int | None) -> list[Document]:
    if document_id is None:
        return [doc for doc, _n in list_documents(session)]
    doc = get_document(session, document_id)
    if doc is None or not doc.active:
        _fail(f"no imported document {document_id} (`flywheel docs list` shows them)")
    return [doc]


def report_line(doc: Document, report: QuestionReport) -> str:
    """One document's generated questions: how many, filtered by which check, reviewed how."""
    filtered = sum(report.filtered.values())
    why = ", ".join(f"{n} {reason}" for reason, n in report.filtered.most_common())
    return (f"{doc.id}: {doc.title}: {report.generated} generated, {filtered} filtered" + (f" ({why})" if why else "")
            + f", {report.pending} waiting for review, {report.approved} approved "
            f"({report.approved_as_is} as generated), {report.rejected} rejected; approved as generated "
            f"{report.share(report.approved_as_is):.0%}, filtered {report.share(filtered):.0%}")


def _generate(document_ids: list[int], settings) -> None:
    # deferred: httpx, the embedder (torch) and the memory: seconds, only when generating
    from flywheel.embedding import EmbedderError, load_embedder
    from flywheel.memory import MemorySettings
    from trainer.augment import gateway_client
    from trainer.docquestions import generate_questions

    if not settings.gateway_url:
        _fail("FLYWHEEL_GATEWAY_URL is not set: the questions are asked through the gateway")
    try:
        embedder = load_embedder(MemorySettings().embed_model)
    except EmbedderError as exc:
        _fail(str(exc))
    with gateway_client(settings.gateway_url, settings.gateway_api_key) as client, session_scope() as s:
        for document_id in document_ids:
            done = generate_questions(s, client, embedder, get_document(s, document_id), settings)
            typer.echo(f"{document_id}: asked about {done.asked} sections: {done.kept} questions wait for review, "
                       f"{sum(done.filtered.values())} filtered"
                       + (f", {done.unanswered} replies without a question" if done.unanswered else ""))
            if done.error:
                _fail(f"the gateway failed ({done.error}); {done.left} sections left: run again", 1)


@docs_app.command("questions")
def questions_cmd(
    document_id: int | None = typer.Argument(None, help="one document (default: every imported one)"),
    generate: bool = typer.Option(False, "--generate", help="first ask the model, through FLYWHEEL_GATEWAY_URL, "
                                  "about each section not yet asked about in its current text"),
) -> None:
    """Questions generated from documents' sections, per document: generated, filtered (by the
    check they failed), waiting for review, approved (as generated or edited), rejected; with a
    DOC_ID, the ones waiting for review too."""
    settings = _document_settings()
    with session_scope() as s:
        ids = [doc.id for doc in _documents(s, document_id)]
    if not ids:
        typer.echo("no documents imported yet (`flywheel docs import PATH|URL`)")
        return
    if generate:
        _generate(ids, settings)
    with session_scope() as s:
        for doc_id in ids:
            typer.echo(report_line(get_document(s, doc_id), question_report(s, doc_id)))
        if document_id is not None:
            for row, title in with_sections(s, pending_questions(s, document_id)):
                typer.echo(f"  {row.id}\t{title}\tQ: {row.question}\tA: {row.answer}")


def _remember(session: Session, doc: Document, rows: list[DocQuestion]) -> str:
    """Approved questions into the memory, as imported examples are; what to say about it."""
    # deferred: the memory and its embedder (numpy, torch): seconds, only when approving
    from flywheel.embedding import EmbedderError
    from flywheel.memory import Memory, MemorySettings

    memory = Memory(MemorySettings())
    if not memory.settings.memory:
        return "the memory is off (FLYWHEEL_MEMORY=0): they train with the next run"
    try:
        for row in rows:
            memory.remember(session, **memory_item(row, doc))
    except EmbedderError as exc:
        return f"they train with the next run, but the memory could not learn them: {exc}"
    return "they answer from the memory now and train with the next run"


@docs_app.command("approve")
def approve_cmd(
    document_id: int = typer.Argument(..., help="the id `flywheel docs list` shows"),
    actor: str | None = typer.Option(None, "--as", help=ACTOR_HELP),
) -> None:
    """Approve every generated question of a document that waits for review, as generated:
    each becomes a training example and a memory item (audited)."""
    try:
        with session_scope() as s:
            doc, rows = approve_document(s, document_id, actor=cli_actor(actor))
            said = _remember(s, doc, rows)
    except StoreError as exc:
        _fail(str(exc), 1)
    typer.echo(f"approved {len(rows)} questions from {doc.id}: {doc.title}; {said}")


@docs_app.command("approve-question")
def approve_question_cmd(
    question_id: int = typer.Argument(..., help="the id `flywheel docs questions DOC_ID` shows"),
    question: str | None = typer.Option(None, "--question", help="approve with this question instead (an edit)"),
    answer: str | None = typer.Option(None, "--answer", help="approve with this answer instead (an edit)"),
    actor: str | None = typer.Option(None, "--as", help=ACTOR_HELP),
) -> None:
    """Approve one generated question (optionally edited): it becomes a training example and a
    memory item (audited)."""
    try:
        with session_scope() as s:
            doc, row = decide_question(s, question_id, actor=cli_actor(actor), approve=True,
                                       question=question, answer=answer)
            said = _remember(s, doc, [row])
    except StoreError as exc:
        _fail(str(exc), 1)
    typer.echo(f"approved question {row.id}{' (edited)' if row.edited else ''}: {row.question}; {said}")


@docs_app.command("reject-question")
def reject_question_cmd(
    question_id: int = typer.Argument(..., help="the id `flywheel docs questions DOC_ID` shows"),
    actor: str | None = typer.Option(None, "--as", help=ACTOR_HELP),
) -> None:
    """Reject one generated question: it teaches nothing (audited)."""
    try:
        with session_scope() as s:
            _doc, row = decide_question(s, question_id, actor=cli_actor(actor), approve=False)
    except StoreError as exc:
        _fail(str(exc), 1)
    typer.echo(f"rejected question {row.id}: {row.question}")
