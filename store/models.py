"""The schema: every table Flywheel keeps. Status values are plain strings checked in Python,
so migrations never have to alter database enum types."""
from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Any, Optional

from sqlalchemy import JSON, BigInteger, Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Aware UTC; SQLModel's UTCDateTime stores it on SQLite and PostgreSQL alike."""
    return datetime.now(timezone.utc)


def _json(default=dict) -> Any:
    return Field(default_factory=default, sa_column=Column(JSON, nullable=False))


class Role(StrEnum):
    user = "user"
    assistant = "assistant"
    system = "system"


class FeedbackKind(StrEnum):
    reaction = "reaction"  # 👍/👎 emoji on a bot answer
    button = "button"  # feedback buttons under a bot answer
    correction = "correction"  # "suggest a better answer": a gold answer
    label = "label"  # configurable label emoji → class label
    golden = "golden"  # an admin marked the item as a regression (golden) item
    shortcut = "shortcut"  # "Add to training data" message shortcut


class ReviewState(StrEnum):
    """Review of what someone teaches (a correction, a 👍, "Add to training data"): while review is
    on, those of people who are neither admins nor reviewers wait until a reviewer decides."""
    pending = "pending"
    approved = "approved"
    rejected = "rejected"


class Visibility(StrEnum):
    """Who may see a channel's messages, as Slack last said. Only `public` is the whole team's:
    Slack Connect channels (`external`) are shared with another organisation, and what Slack
    would not tell (`unknown`: an error, a missing scope) counts as private."""
    public = "public"
    private = "private"  # a private channel or a group DM
    direct = "direct"  # a DM with the bot
    external = "external"  # Slack Connect: shared with another organisation
    unknown = "unknown"


class ExampleStatus(StrEnum):
    active = "active"
    excluded = "excluded"


class Split(StrEnum):
    train = "train"
    eval = "eval"
    golden = "golden"


class RunStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


class VersionStatus(StrEnum):
    candidate = "candidate"  # registered, gate passed, waiting for an admin
    rejected = "rejected"  # gate failed or an admin rejected it
    approved = "approved"  # an admin approved it; not (yet) live
    production = "production"  # the production alias points here
    retired = "retired"  # was production once


class Conversation(SQLModel, table=True):
    """A Slack thread (or a DM's top level): the unit of dialogue context."""

    __table_args__ = (UniqueConstraint("channel", "thread_ts", name="uq_conversation_thread"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    channel: str = Field(max_length=64)
    thread_ts: str = Field(max_length=32)
    created_at: datetime = Field(default_factory=utcnow)


class Message(SQLModel, table=True):
    """One message in a conversation; for the bot's answers also who produced it and how fast."""

    __table_args__ = (UniqueConstraint("channel", "ts", name="uq_message_channel_ts"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    conversation_id: int = Field(foreign_key="conversation.id", index=True)
    channel: str = Field(max_length=64)
    ts: str = Field(max_length=32)
    role: str = Field(max_length=16)
    author: Optional[str] = Field(default=None, max_length=64)
    text: str = Field(sa_column=Column(Text, nullable=False))
    model_version: Optional[str] = Field(default=None, max_length=64)
    latency_ms: Optional[float] = None
    error: Optional[str] = Field(default=None, sa_column=Column(Text))
    # a bot answer's memory items, as their keys ("section:<id>:<version>" for a document's
    # section): what its citation named ([] none); None on other messages and older answers
    cited: Optional[list] = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)


class Feedback(SQLModel, table=True):
    """The latest vote of one user on one message for one kind; retraction keeps the row."""

    __table_args__ = (UniqueConstraint("message_id", "user", "kind", name="uq_feedback_vote"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    message_id: int = Field(foreign_key="message.id", index=True)
    user: str = Field(max_length=64)
    kind: str = Field(max_length=16)
    value: str = Field(max_length=64)
    correction: Optional[str] = Field(default=None, sa_column=Column(Text))
    is_admin: bool = False
    retracted: bool = False
    # Corrections, 👍 votes and shortcuts: pending / approved / rejected (None: not reviewed, e.g.
    # review off or from before reviews covered it; counts as before). 👎 and labels: None.
    review: Optional[str] = Field(default=None, max_length=16, index=True)
    reviewed_by: Optional[str] = Field(default=None, max_length=64)
    reviewed_at: Optional[datetime] = None
    history: list = _json(list)  # earlier values: [{"value", "at", "retracted"}]
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Example(SQLModel, table=True):
    """A training / evaluation item: context messages and a target answer or class label."""

    id: Optional[int] = Field(default=None, primary_key=True)
    content_hash: str = Field(max_length=64, unique=True)
    messages: list = _json(list)  # [{"role", "content"}], the last one is the user's question
    answer: Optional[str] = Field(default=None, sa_column=Column(Text))
    label: Optional[str] = Field(default=None, max_length=64)
    rejected_answer: Optional[str] = Field(default=None, sa_column=Column(Text))
    source: str = Field(max_length=32)  # import / feedback / correction / augmented / ...
    provenance: dict = _json(dict)  # feedback ids, message ids, file names
    status: str = Field(default=ExampleStatus.active, max_length=16, index=True)
    golden: bool = Field(default=False, index=True)
    split: Optional[str] = Field(default=None, max_length=16)
    message_id: Optional[int] = Field(default=None, foreign_key="message.id", index=True)
    # Where what it teaches may be seen: None for the whole workspace (it may train the shared
    # model), else the channel it was taught in (a DM, a private or Slack Connect channel).
    visible_in: Optional[str] = Field(default=None, max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)


class DatasetSnapshot(SQLModel, table=True):
    """A built dataset: same inputs and parameters give the same content hash."""

    id: Optional[int] = Field(default=None, primary_key=True)
    content_hash: str = Field(max_length=64, index=True)
    counts: dict = _json(dict)
    params: dict = _json(dict)
    path: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class TrainingRun(SQLModel, table=True):
    """One training cycle, from queued to a verdict; progress and loss history for the bot."""

    id: Optional[int] = Field(default=None, primary_key=True)
    status: str = Field(default=RunStatus.queued, max_length=16, index=True)
    progress: float = 0.0
    step: int = 0
    total_steps: int = 0
    hyperparams: dict = _json(dict)
    metrics: list = _json(list)  # [{"step", "loss", "lr", ...}]
    dataset_snapshot_id: Optional[int] = Field(default=None, foreign_key="datasetsnapshot.id")
    lease_owner: Optional[str] = Field(default=None, max_length=128)
    heartbeat_at: Optional[datetime] = None
    queued_by: Optional[str] = Field(default=None, max_length=64)
    error: Optional[str] = Field(default=None, sa_column=Column(Text))
    model_version: Optional[str] = Field(default=None, max_length=64)
    # The Slack message that shows this run's progress and report (updated, not reposted).
    report_channel: Optional[str] = Field(default=None, max_length=64)
    report_ts: Optional[str] = Field(default=None, max_length=32)
    reported_at: Optional[datetime] = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None


class Lease(SQLModel, table=True):
    """A named mutual-exclusion lease with expiry: one trainer at a time across machines."""

    name: str = Field(primary_key=True, max_length=64)
    owner: str = Field(max_length=128)
    acquired_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


class ModelVersion(SQLModel, table=True):
    """An immutable fine-tuned adapter and its evaluation verdict."""

    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    adapter_path: str = Field(sa_column=Column(Text, nullable=False))
    adapter_sha256: str = Field(max_length=64)
    base_model: str = Field(max_length=256)
    run_id: Optional[int] = Field(default=None, foreign_key="trainingrun.id")
    dataset_snapshot_id: Optional[int] = Field(default=None, foreign_key="datasetsnapshot.id")
    report: dict = _json(dict)
    report_path: Optional[str] = Field(default=None, sa_column=Column(Text))
    gate_passed: bool = False
    gate_reasons: list = _json(list)
    status: str = Field(default=VersionStatus.candidate, max_length=16, index=True)
    created_at: datetime = Field(default_factory=utcnow)


class ReportPlot(SQLModel, table=True):
    """A version's evaluation plot (PNG), kept in the store so the bot can post it from any
    machine: the trainer's disk is not the bot's in a deployment."""

    version_name: str = Field(primary_key=True, foreign_key="modelversion.name", max_length=64)
    png: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class Alias(SQLModel, table=True):
    """A movable name (production, candidate) → version; None means the base model."""

    name: str = Field(primary_key=True, max_length=32)
    version_name: Optional[str] = Field(default=None, foreign_key="modelversion.name", max_length=64)
    updated_at: datetime = Field(default_factory=utcnow)
    updated_by: Optional[str] = Field(default=None, max_length=64)


class AuditEvent(SQLModel, table=True):
    """Who did what to which target, including refusals."""

    __table_args__ = (Index("ix_audit_action_target", "action", "target"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    actor: str = Field(max_length=64)
    action: str = Field(max_length=64)
    target: str = Field(max_length=128)
    outcome: str = Field(default="ok", max_length=16)  # ok / refused / error
    detail: dict = _json(dict)
    at: datetime = Field(default_factory=utcnow, index=True)


class SlackEventReceipt(SQLModel, table=True):
    """Slack event ids already handled: retried deliveries are answered once."""

    event_id: str = Field(primary_key=True, max_length=128)
    kind: str = Field(default="event", max_length=64)
    received_at: datetime = Field(default_factory=utcnow)


class GatewayReplica(SQLModel, table=True):
    """What each gateway replica serves, so 'live on 3/3 replicas' can be shown."""

    id: str = Field(primary_key=True, max_length=128)
    backend: str = Field(default="transformers", max_length=32)
    served: dict = _json(dict)  # alias → version name (None = base)
    loaded: list = _json(list)  # version names loaded
    last_error: Optional[str] = Field(default=None, sa_column=Column(Text))
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)


class Channel(SQLModel, table=True):
    """A channel the bot answered in: its visibility as Slack last said (refreshed by the bot) and
    whether an admin opted it into training the shared model (`/flywheel share #channel`). What
    was said in a channel trains the model everyone uses only when the channel is public or opted
    in; a channel without a row counts as private."""

    id: str = Field(primary_key=True, max_length=64)
    visibility: str = Field(default=Visibility.unknown, max_length=16)
    shared_for_training: bool = False
    shared_by: Optional[str] = Field(default=None, max_length=64)
    shared_at: Optional[datetime] = None
    checked_at: datetime = Field(default_factory=utcnow)


SECTION_SOURCE = "document"  # MemoryItem.source of an imported document's section (store.documents)


class MemoryItem(SQLModel, table=True):
    """What the team taught, retrievable by meaning at answer time (no retrain needed): an
    approved correction, a golden item or an imported example, with its sentence vector.
    `visible_in` None means every conversation; otherwise only that channel (a DM or a private
    channel's correction never reaches anyone outside it)."""

    id: Optional[int] = Field(default=None, primary_key=True)
    key: str = Field(max_length=128, unique=True)  # message:<id> or example:<id>
    question: str = Field(sa_column=Column(Text, nullable=False))
    answer: str = Field(sa_column=Column(Text, nullable=False))
    source: str = Field(max_length=32)  # correction / golden / import / SECTION_SOURCE
    author: Optional[str] = Field(default=None, max_length=64)
    channel: Optional[str] = Field(default=None, max_length=64)  # where it was taught
    visible_in: Optional[str] = Field(default=None, max_length=64, index=True)
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))  # float32, unit length
    active: bool = Field(default=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    # the database's order of changes (store.memory.next_change): readers refresh by it, not by a host's clock
    change_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, index=True))


class Counter(SQLModel, table=True):
    """A database-side counter, one row each: `memory` numbers memory item changes in commit
    order (the row stays locked by the writer until its transaction ends)."""

    name: str = Field(primary_key=True, max_length=32)
    value: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))


class Document(SQLModel, table=True):
    """An imported document (a file or a URL, `flywheel docs import`): its sections answer as
    notes (DocumentSection → a memory item each). `visible_in` None: every conversation; else
    only that channel, as for memory items. `version` goes up each time an import changed it."""

    id: Optional[int] = Field(default=None, primary_key=True)
    source: str = Field(sa_column=Column(Text, nullable=False, unique=True))  # absolute path or URL
    title: str = Field(sa_column=Column(Text, nullable=False))
    kind: str = Field(max_length=16)  # markdown / html / text / pdf
    content_hash: str = Field(max_length=64)  # of its sections' (redacted) text
    version: int = 1
    visible_in: Optional[str] = Field(default=None, max_length=64)
    imported_by: Optional[str] = Field(default=None, max_length=64)
    active: bool = Field(default=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class DocumentSection(SQLModel, table=True):
    """One chunk of a document under its own headings: `title` is its path ("Onboarding ›
    Laptops"), `anchor` that path with its place among chunks of the same path, which keeps the
    row (and its id) across imports while its text changes. Redacted before it is stored."""

    __table_args__ = (UniqueConstraint("document_id", "anchor", name="uq_section_anchor"),)
    id: Optional[int] = Field(default=None, primary_key=True)
    document_id: int = Field(foreign_key="document.id", index=True)
    anchor: str = Field(sa_column=Column(Text, nullable=False))
    title: str = Field(sa_column=Column(Text, nullable=False))
    position: int = 0
    text: str = Field(sa_column=Column(Text, nullable=False))
    content_hash: str = Field(max_length=64)
    version: int = 1
    active: bool = Field(default=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)  # when this text was imported


class DocQuestionState(StrEnum):
    """A question generated from a document's section (trainer/docquestions.py), on its way to
    the training data: `filtered` never reaches a reviewer (the reason says which check it
    failed); `pending` waits for one; `approved` teaches (an example and a memory item) and
    `rejected` does not; `stale`: its section changed or went after it was generated, so what it
    was checked and reviewed against is gone (an approved one stops teaching)."""
    filtered = "filtered"
    pending = "pending"
    approved = "approved"
    rejected = "rejected"
    stale = "stale"


DOCUMENT_EXAMPLE_SOURCE = "document"  # Example.source of an approved generated question (store.docquestions)


class DocQuestion(SQLModel, table=True):
    """A question a document's section answers and its short answer taken from the section, as
    the model generated it through the gateway (or as a reviewer edited it), tied to the text it
    was checked against (`section_version`: the section's version then; a re-import that changes
    the section bumps its version, and the questions of an older version are no longer current)."""

    id: Optional[int] = Field(default=None, primary_key=True)
    document_id: int = Field(foreign_key="document.id", index=True)
    section_id: int = Field(foreign_key="documentsection.id", index=True)
    section_version: int
    question: str = Field(sa_column=Column(Text, nullable=False))
    answer: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default=DocQuestionState.pending, max_length=16, index=True)
    reason: Optional[str] = Field(default=None, max_length=64)  # why filtered or stale
    edited: bool = False  # a reviewer changed the question or the answer before approving
    decided_by: Optional[str] = Field(default=None, max_length=64)
    decided_at: Optional[datetime] = None
    example_id: Optional[int] = Field(default=None, foreign_key="example.id")
    review_ts: Optional[str] = Field(default=None, max_length=32)  # the admin channel's post showing it
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
