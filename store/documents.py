"""Imported documents and their sections (issue 28). A section answers through the memory as an
item of its own kind (`store.models.SECTION_SOURCE`), keyed by the section's id and version, so a changed
section gets a new item (cited with the date its text was imported) and the old one goes.

The importer (trainer/documents.py) diffs a new import against `sections_of`, embeds what is new
or changed, then writes with `save_import`; `remove_document` retires a document's sections and
their memory items."""
from __future__ import annotations

from dataclasses import dataclass, field

from sqlmodel import Session, col, func, select

from store.audit import add_audit
from store.docquestions import retire_section_questions
from store.errors import NotFoundError
from store.memory import deactivate_memory_items, memory_items_by_key
from store.models import Document, DocumentSection, utcnow

SECTION_KEY = "section:"  # how a section's memory item key starts
SECTION_FLAGGED = "section.flagged"  # the audit action: a correction says a section may be out of date


def section_key(section: DocumentSection) -> str:
    """The memory item of one version of a section."""
    return f"{SECTION_KEY}{section.id}:{section.version}"


@dataclass
class SectionText:
    """A section as an import found it (redacted): where it sits and what it says."""

    anchor: str
    title: str
    position: int
    text: str
    content_hash: str


@dataclass
class ImportPlan:
    """What an import changes, decided before anything is written (trainer/documents.py)."""

    source: str
    title: str
    kind: str
    content_hash: str
    visible_in: str | None
    imported_by: str | None
    unchanged: list[DocumentSection] = field(default_factory=list)
    changed: list[tuple[DocumentSection, SectionText]] = field(default_factory=list)
    new: list[SectionText] = field(default_factory=list)
    retired: list[DocumentSection] = field(default_factory=list)

    @property
    def writes(self) -> bool:
        return bool(self.changed or self.new or self.retired)


def document_by_source(session: Session, source: str) -> Document | None:
    return session.exec(select(Document).where(Document.source == source)).first()


def get_document(session: Session, document_id: int) -> Document | None:
    return session.get(Document, document_id)


def sections_of(session: Session, document_id: int, *, active: bool | None = None) -> list[DocumentSection]:
    """A document's sections in document order; `active`: only those (True) or the retired (False)."""
    stmt = select(DocumentSection).where(DocumentSection.document_id == document_id)
    if active is not None:
        stmt = stmt.where(DocumentSection.active == active)
    return list(session.exec(stmt.order_by(col(DocumentSection.position), col(DocumentSection.id))).all())


def remembered_keys(session: Session, sections: list[DocumentSection]) -> set[str]:
    """Which of these sections' current memory items are active (an import interrupted after its
    sections were written may have left some out: the next import writes them)."""
    rows = memory_items_by_key(session, [section_key(s) for s in sections])
    return {row.key for row in rows if row.active}


def save_import(session: Session, plan: ImportPlan) -> tuple[Document, list[DocumentSection]]:
    """Write the document and its sections as planned, retire the memory items of changed and
    vanished sections; returns the document and the sections that need a (new) memory item, in
    the order of `plan.changed` then `plan.new`. Commits."""
    doc = document_by_source(session, plan.source) or Document(source=plan.source, title=plan.title, kind=plan.kind,
                                                               content_hash=plan.content_hash, version=0)
    if doc.id is None or plan.writes or not doc.active or doc.visible_in != plan.visible_in:
        doc.version += 1
    doc.title, doc.kind, doc.content_hash, doc.visible_in = plan.title, plan.kind, plan.content_hash, plan.visible_in
    doc.imported_by, doc.active, doc.updated_at = plan.imported_by, True, utcnow()
    session.add(doc)
    session.flush()
    stale = [section_key(s) for s, _ in plan.changed] + [section_key(s) for s in plan.retired]
    for row in plan.retired:
        row.active, row.updated_at = False, utcnow()
        session.add(row)
    to_remember = []
    for row, found in plan.changed:
        row.title, row.position, row.text, row.content_hash = found.title, found.position, found.text, found.content_hash
        row.version, row.active, row.updated_at = row.version + 1, True, utcnow()
        session.add(row)
        to_remember.append(row)
    for found in plan.new:
        row = DocumentSection(document_id=doc.id, anchor=found.anchor, title=found.title, position=found.position,
                              text=found.text, content_hash=found.content_hash)
        session.add(row)
        to_remember.append(row)
    for row in plan.unchanged:
        session.add(row)  # positions may have moved (trainer/documents.py sets them)
    session.flush()
    deactivate_memory_items(session, stale)  # in the same transaction as the sections' change
    retire_section_questions(session, [s.id for s, _ in plan.changed], "section changed")
    retire_section_questions(session, [s.id for s in plan.retired], "section removed")
    session.commit()
    for row in [doc, *to_remember]:
        session.refresh(row)
    return doc, to_remember


def remove_document(session: Session, document_id: int) -> Document:
    """Retire a document: its sections and their memory items stop answering. Commits."""
    doc = session.get(Document, document_id)
    if doc is None or not doc.active:
        raise NotFoundError(f"no imported document {document_id} (`flywheel docs list` shows them)")
    sections = sections_of(session, document_id, active=True)
    doc.active, doc.updated_at = False, utcnow()
    session.add(doc)
    for row in sections:
        row.active, row.updated_at = False, utcnow()
        session.add(row)
    deactivate_memory_items(session, [section_key(row) for row in sections])
    retire_section_questions(session, [row.id for row in sections], "document removed")
    session.commit()
    session.refresh(doc)
    return doc


def cited_sections(session: Session, keys: list[str]) -> list[tuple[Document, DocumentSection]]:
    """The sections among an answer's cited memory item keys (Message.cited) whose text is still
    the one the answer was given (same version, active), with their documents; in key order."""
    out = []
    for key in keys:
        if not key.startswith(SECTION_KEY):
            continue
        section_id, _, version = key.removeprefix(SECTION_KEY).partition(":")
        section = session.get(DocumentSection, int(section_id))
        if section is None or not section.active or str(section.version) != version:
            continue
        out.append((session.get(Document, section.document_id), section))
    return out


def flag_cited_sections(session: Session, keys: list[str], *, actor: str, feedback_id: int,
                        message_id: int) -> list[tuple[Document, DocumentSection]]:
    """A correction (`feedback_id`, by `actor`) of an answer that cited these memory item keys:
    each cited section still as the answer had it may be out of date, audited (`section.flagged`,
    target `section ID`); the sections flagged, with their documents. Commits."""
    cited = cited_sections(session, keys)
    for doc, section in cited:
        add_audit(session, actor=actor, action=SECTION_FLAGGED, target=f"section {section.id}",
                  detail={"document": doc.id, "section": section.title, "version": section.version,
                          "feedback_id": feedback_id, "message_id": message_id})
    session.commit()
    return cited


def list_documents(session: Session) -> list[tuple[Document, int]]:
    """Active documents, oldest first, with how many active sections each has."""
    count = (select(DocumentSection.document_id, func.count().label("n"))
             .where(col(DocumentSection.active)).group_by(col(DocumentSection.document_id)).subquery())
    stmt = (select(Document, func.coalesce(count.c.n, 0)).outerjoin(count, count.c.document_id == Document.id)
            .where(col(Document.active)).order_by(col(Document.id)))
    return [(doc, int(n)) for doc, n in session.exec(stmt).all()]
