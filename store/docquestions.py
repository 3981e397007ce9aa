"""Questions generated from imported documents' sections (issue 28), on their way to the training
data through review. trainer/docquestions.py asks the model for the questions each section answers,
checks them and stores them here: `filtered` (with the check it failed) or `pending`. A reviewer
approves (one, or a whole document at once, optionally edited) or rejects; an approval stores the
pair as an example (source `document`, visible where the document is, provenance naming the
document, section and question) in the decision's own transaction with its audit event, and the
caller then puts it in the memory (`memory_item`), as an imported example is.

Questions belong to one version of their section's text: a re-import that changes or retires a
section, or removes its document, makes its pending and approved questions `stale` in the same
transaction (store/documents.py); an approved one stops teaching (its example excluded, its memory
item off). The section's new text is asked about anew; other sections keep theirs."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlmodel import Session, col, select

from store.audit import add_audit
from store.errors import InvalidStateError, NotFoundError
from store.examples import example_hash, stage_exclusions
from store.memory import deactivate_memory_items
from store.models import (
    DOCUMENT_EXAMPLE_SOURCE,
    DocQuestion,
    Document,
    DocumentSection,
    Example,
    ExampleStatus,
    utcnow,
)
from store.models import DocQuestionState as State

STALE = "stale: its document section changed"  # an approved question's example, excluded
MEMORY_SOURCE = "import"  # an approved question in the memory: cited and answered as an imported example


def question_key(row: DocQuestion) -> str:
    """The memory item of an approved question."""
    return f"docquestion:{row.id}"


def memory_item(row: DocQuestion, doc: Document) -> dict:
    """What the memory holds for an approved question (`Memory.remember`'s keywords)."""
    return {"key": question_key(row), "question": row.question, "answer": row.answer, "source": MEMORY_SOURCE,
            "author": None, "channel": doc.visible_in, "visible_in": doc.visible_in}


@dataclass
class QuestionReport:
    """A document's questions about its sections' current text."""

    generated: int = 0
    filtered: Counter = field(default_factory=Counter)  # the check failed → how many
    pending: int = 0
    approved: int = 0
    approved_as_is: int = 0  # approved without an edit
    rejected: int = 0

    def share(self, count: int) -> float:
        return count / self.generated if self.generated else 0.0


def _current():
    """Questions (with their section) about the current text of active sections."""
    return (select(DocQuestion, DocumentSection).join(DocumentSection, DocumentSection.id == DocQuestion.section_id)
            .where(col(DocumentSection.active), DocQuestion.section_version == DocumentSection.version))


def current_questions(session: Session, document_id: int) -> list[DocQuestion]:
    """A document's questions about its sections' current text, in document order."""
    stmt = (_current().where(DocQuestion.document_id == document_id)
            .order_by(col(DocumentSection.position), col(DocQuestion.id)))
    return [row for row, _section in session.exec(stmt).all()]


def sections_to_ask(session: Session, document_id: int) -> list[DocumentSection]:
    """The document's active sections not yet asked about in their current text (new, changed,
    or left when an earlier generation stopped, or whose reply held no pair), in order."""
    asked = (select(DocQuestion.id).where(DocQuestion.section_id == DocumentSection.id,
                                          DocQuestion.section_version == DocumentSection.version).exists())
    stmt = (select(DocumentSection).where(DocumentSection.document_id == document_id, col(DocumentSection.active),
                                          ~asked).order_by(col(DocumentSection.position), col(DocumentSection.id)))
    return list(session.exec(stmt).all())


def add_questions(session: Session, section: DocumentSection,
                  found: list[tuple[str, str, str | None]]) -> list[DocQuestion]:
    """Store what was generated for one section's current text: (question, answer, the check it
    failed, or None: it waits for review). Commits."""
    rows = [DocQuestion(document_id=section.document_id, section_id=section.id, section_version=section.version,
                        question=question, answer=answer, reason=reason,
                        status=State.pending if reason is None else State.filtered)
            for question, answer, reason in found]
    session.add_all(rows)
    session.commit()
    for row in rows:
        session.refresh(row)
    return rows


def retire_section_questions(session: Session, section_ids: list[int], reason: str) -> int:
    """These sections' text changed or went: their pending and approved questions become stale,
    an approved one's example is excluded and its memory item switched off. Staged in the
    caller's transaction (the import or removal that changed them); how many went stale."""
    if not section_ids:
        return 0
    rows = list(session.exec(select(DocQuestion).where(
        col(DocQuestion.section_id).in_(section_ids),
        col(DocQuestion.status).in_((State.pending, State.approved)))).all())
    taught = [row for row in rows if row.status == State.approved]
    own = session.exec(select(Example.id).where(col(Example.id).in_([r.example_id for r in taught if r.example_id]),
                                                Example.source == DOCUMENT_EXAMPLE_SOURCE)).all()
    stage_exclusions(session, list(own), STALE)
    deactivate_memory_items(session, [question_key(row) for row in taught])
    now = utcnow()
    for row in rows:
        row.status, row.reason, row.updated_at = State.stale, reason, now
        session.add(row)
    return len(rows)


def question_report(session: Session, document_id: int) -> QuestionReport:
    report = QuestionReport()
    for row in current_questions(session, document_id):
        report.generated += 1
        if row.status == State.filtered:
            report.filtered[row.reason or "?"] += 1
        elif row.status == State.pending:
            report.pending += 1
        elif row.status == State.approved:
            report.approved += 1
            report.approved_as_is += not row.edited
        elif row.status == State.rejected:
            report.rejected += 1
    return report


def pending_questions(session: Session, document_id: int | None = None, *,
                      unposted: bool = False) -> list[DocQuestion]:
    """Questions waiting for review (of one document), by document then section order;
    `unposted`: only those the admin channel has not been shown."""
    stmt = (select(DocQuestion).join(DocumentSection, DocumentSection.id == DocQuestion.section_id)
            .where(DocQuestion.status == State.pending)
            .order_by(col(DocQuestion.document_id), col(DocumentSection.position), col(DocQuestion.id)))
    if document_id is not None:
        stmt = stmt.where(DocQuestion.document_id == document_id)
    if unposted:
        stmt = stmt.where(col(DocQuestion.review_ts).is_(None))
    return list(session.exec(stmt).all())


def with_sections(session: Session, rows: list[DocQuestion]) -> list[tuple[DocQuestion, str]]:
    """Each question with its section's title path."""
    titles = {sec.id: sec.title for sec in session.exec(select(DocumentSection).where(
        col(DocumentSection.id).in_({row.section_id for row in rows}))).all()} if rows else {}
    return [(row, titles[row.section_id]) for row in rows]


def posted_questions(session: Session, ts: str) -> list[DocQuestion]:
    """The questions the admin channel's post `ts` shows, in the order it shows them."""
    stmt = (select(DocQuestion).join(DocumentSection, DocumentSection.id == DocQuestion.section_id)
            .where(DocQuestion.review_ts == ts).order_by(col(DocumentSection.position), col(DocQuestion.id)))
    return list(session.exec(stmt).all())


def get_question(session: Session, question_id: int) -> DocQuestion | None:
    return session.get(DocQuestion, question_id)


def mark_posted(session: Session, question_ids: list[int], ts: str) -> None:
    """The admin channel's post `ts` shows these questions. Commits."""
    for row in session.exec(select(DocQuestion).where(col(DocQuestion.id).in_(question_ids))).all():
        row.review_ts = ts
        session.add(row)
    session.commit()


def _edit(row: DocQuestion, question: str | None, answer: str | None) -> None:
    """A reviewer's edit of the question or the answer (None: kept as generated)."""
    new_question = (row.question if question is None else question).strip()
    new_answer = (row.answer if answer is None else answer).strip()
    if not new_question or not new_answer:
        raise InvalidStateError("the edited question or answer is empty")
    if (new_question, new_answer) != (row.question, row.answer):
        row.question, row.answer, row.edited = new_question, new_answer, True


def _teach(session: Session, row: DocQuestion, doc: Document) -> None:
    """The approved pair as an example, staged (upsert_example commits on its own; here the
    example, the decision and its audit event commit together). The same pair taught before is
    the same example: it is marked and, if a change of its section had excluded it, active again."""
    messages = [{"role": "user", "content": row.question}]
    digest = example_hash(messages, row.answer, None)
    mark = {"document_id": row.document_id, "section_id": row.section_id, "doc_question": row.id}
    example = session.exec(select(Example).where(Example.content_hash == digest)).first()
    if example is None:
        example = Example(content_hash=digest, messages=messages, answer=row.answer, source=DOCUMENT_EXAMPLE_SOURCE,
                          provenance=mark, visible_in=doc.visible_in)
    else:
        if example.status == ExampleStatus.excluded and example.provenance.get("excluded_reason") == STALE:
            example.status = ExampleStatus.active
        example.provenance, example.updated_at = {**example.provenance, **mark}, utcnow()
    session.add(example)
    session.flush()
    row.example_id = example.id


def _decide(session: Session, rows: list[DocQuestion], *, actor: str, approve: bool,
            batch: bool) -> tuple[Document, list[DocQuestion]]:
    doc = session.get(Document, rows[0].document_id)
    now = utcnow()
    for row in rows:
        if approve:
            _teach(session, row, doc)
        row.status = State.approved if approve else State.rejected
        row.decided_by, row.decided_at, row.updated_at = actor, now, now
        session.add(row)
    add_audit(session, actor=actor, action=f"docquestion.{'approve' if approve else 'reject'}",
              target=f"document {doc.id}", detail={"questions": [r.id for r in rows], "batch": batch,
                                                   "edited": [r.id for r in rows if r.edited]})
    session.commit()
    for row in [doc, *rows]:
        session.refresh(row)
    return doc, rows


def decide_question(session: Session, question_id: int, *, actor: str, approve: bool,
                    question: str | None = None, answer: str | None = None) -> tuple[Document, DocQuestion]:
    """Approve (optionally with the reviewer's question or answer) or reject one pending question;
    the row is locked so two reviewers cannot both decide. Commits."""
    row = session.exec(select(DocQuestion).where(DocQuestion.id == question_id).with_for_update()).first()
    if row is None:
        raise NotFoundError(f"no generated question {question_id} (`flywheel docs questions` lists them)")
    if row.status != State.pending:
        by = f" by <@{row.decided_by}>" if row.decided_by else ""
        raise InvalidStateError(f"question {question_id} is already {row.status}{by}")
    if not approve and (question is not None or answer is not None):
        raise InvalidStateError("an edit approves: reject without one")
    if approve:
        _edit(row, question, answer)
    doc, (row,) = _decide(session, [row], actor=actor, approve=approve, batch=False)
    return doc, row


def approve_document(session: Session, document_id: int, *, actor: str) -> tuple[Document, list[DocQuestion]]:
    """Approve every question of the document that waits for review, as generated. Commits."""
    stmt = (select(DocQuestion).where(DocQuestion.document_id == document_id, DocQuestion.status == State.pending)
            .order_by(col(DocQuestion.id)).with_for_update())
    rows = list(session.exec(stmt).all())
    if not rows:
        if session.get(Document, document_id) is None:
            raise NotFoundError(f"no imported document {document_id} (`flywheel docs list` shows them)")
        raise InvalidStateError(f"no question from document {document_id} waits for review")
    return _decide(session, rows, actor=actor, approve=True, batch=True)
