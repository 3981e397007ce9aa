"""`flywheel docs import`: documents become memory items of their own kind (issue 28).

A document (trainer/docsource.py) is parsed into sections under its headings
(trainer/docparse.py), long sections are cut at paragraphs into chunks that keep their title
path, everything is redacted (trainer/redact.py) before it is hashed or stored, and the result is
compared with the last import of the same source: unchanged chunks keep their rows and memory
items, changed ones get a new version (and a new memory item), vanished ones are retired, new
ones are added (store/documents.py). The memory then gives the best sections to the model as
notes, cited under the answer (flywheel/memory.py)."""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from sqlmodel import Session

from flywheel.embedding import to_bytes
from flywheel.memory import Memory, item_vectors
from flywheel.redact import redact
from store.documents import (
    ImportPlan,
    SectionText,
    document_by_source,
    remembered_keys,
    save_import,
    section_key,
    sections_of,
)
from store.memory import upsert_memory_item
from store.models import SECTION_SOURCE, Document
from trainer.docparse import Parsed, parse
from trainer.docsource import Source

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class DocumentImport:
    """What one import of one document did."""

    document: Document
    sections: int
    unchanged: int
    changed: int
    new: int
    retired: int
    redactions: Counter = field(default_factory=Counter)


def chunks(text: str, limit: int) -> list[str]:
    """`text` cut at paragraph breaks into pieces of at most `limit` characters (a longer
    paragraph at sentence ends, a longer sentence at `limit`)."""
    pieces: list[str] = []
    for paragraph in _PARAGRAPHS.split(text):
        parts = [paragraph] if len(paragraph) <= limit else _SENTENCE_END.split(paragraph)
        for i, part in enumerate(parts):
            joint = " " if i else "\n\n"
            while len(part) > limit:
                pieces.append(part[:limit])
                part = part[limit:]
            if pieces and len(pieces[-1]) + len(joint) + len(part) <= limit:
                pieces[-1] = f"{pieces[-1]}{joint}{part}"
            elif part.strip():
                pieces.append(part)
    return [p.strip() for p in pieces if p.strip()]


def section_texts(parsed: Parsed, limit: int, redactions: Counter) -> list[SectionText]:
    """The document's chunks, redacted, each anchored by its path and its place among the
    chunks of that path (what keeps a chunk's row across imports)."""
    seen: Counter = Counter()
    out = []
    for path, text in parsed.sections:
        title = redact(path, redactions)
        for piece in chunks(redact(text, redactions), limit):
            anchor = f"{title}#{seen[title]}"
            seen[title] += 1
            digest = hashlib.sha256(f"{title}\n{piece}".encode()).hexdigest()
            out.append(SectionText(anchor, title, len(out), piece, digest))
    return out


def plan_import(session: Session, source: Source, title: str, found: list[SectionText], *,
                visible_in: str | None, imported_by: str | None) -> ImportPlan:
    """Compare the chunks found with the document's last import (nothing written)."""
    whole = hashlib.sha256("\n".join(s.content_hash for s in found).encode()).hexdigest()
    plan = ImportPlan(source=source.source, title=title, kind=source.kind, content_hash=whole,
                      visible_in=visible_in, imported_by=imported_by)
    doc = document_by_source(session, source.source)
    rows = sections_of(session, doc.id) if doc is not None else []
    by_anchor = {row.anchor: row for row in rows}
    same_scope = doc is not None and doc.active and doc.visible_in == visible_in
    remembered = remembered_keys(session, [r for r in rows if r.active])
    for item in found:
        row = by_anchor.pop(item.anchor, None)
        if row is None:
            plan.new.append(item)
        elif (row.active and same_scope and row.content_hash == item.content_hash
              and section_key(row) in remembered):
            row.position = item.position
            plan.unchanged.append(row)
        else:
            plan.changed.append((row, item))
    plan.retired = [row for row in by_anchor.values() if row.active]
    return plan


def import_document(session: Session, memory: Memory, source: Source, *, section_chars: int,
                    visible_in: str | None = None, imported_by: str | None = None) -> DocumentImport:
    """Parse, redact, compare, embed what changed, then store it and its memory items."""
    parsed = parse(source)
    redactions: Counter = Counter()
    found = section_texts(parsed, section_chars, redactions)
    plan = plan_import(session, source, redact(parsed.title), found, visible_in=visible_in,
                       imported_by=imported_by)
    texts = [item for _, item in plan.changed] + plan.new
    vectors = item_vectors(memory.embedder, [(t.title, t.text) for t in texts])  # before any write
    doc, rows = save_import(session, plan)
    for row, vector in zip(rows, vectors):
        upsert_memory_item(session, key=section_key(row), question=row.title, answer=row.text,
                           source=SECTION_SOURCE, author=imported_by, channel=visible_in,
                           visible_in=visible_in, vector=to_bytes(vector))
    return DocumentImport(doc, len(found), len(plan.unchanged), len(plan.changed), len(plan.new),
                          len(plan.retired), redactions)
