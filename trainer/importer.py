"""`flywheel dataset import FILE`: question/answer or text/label rows from JSONL or CSV (an FAQ,
a ticket export). The whole file is checked first; a file with bad rows imports nothing and
the error lists every bad row, so nothing is half-imported or silently lost."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from sqlmodel import Session

from flywheel.redact import redact
from store.examples import upsert_example

QUESTION_KEYS = ("question", "prompt", "input", "q")
ANSWER_KEYS = ("answer", "response", "output", "completion", "a")
TEXT_KEYS = ("text", "message", "question")
LABEL_KEYS = ("label", "category", "class", "intent")


class ImportFileError(ValueError):
    """The file cannot be imported; the message says which rows and why."""


@dataclass
class ImportResult:
    rows: int = 0
    created: int = 0
    existing: int = 0
    golden: int = 0
    remembered: int = 0
    errors: list[str] = field(default_factory=list)


def _pick(row: dict, keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
    for key in keys:
        value = lowered.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y") if value is not None else False


def parse_row(row: dict) -> dict:
    """One example's fields from a row, or ValueError saying what is missing."""
    if not isinstance(row, dict):
        raise ValueError("expected an object with question/answer or text/label fields")
    golden = _truthy(row.get("golden"))
    if isinstance(row.get("messages"), list):
        turns = row["messages"]
        if not all(isinstance(t, dict) and t.get("role") in ("system", "user", "assistant")
                   and isinstance(t.get("content"), str) for t in turns):
            raise ValueError("'messages' must be a list of {role: system|user|assistant, content: str}")
        if turns and turns[-1]["role"] == "assistant":
            answer, turns = turns[-1]["content"], turns[:-1]
        else:
            answer = _pick(row, ANSWER_KEYS)
        if not turns or turns[-1]["role"] != "user" or not (answer or "").strip():
            raise ValueError("'messages' must end with a user turn followed by an assistant answer")
        return {"messages": turns, "answer": answer.strip(), "label": None, "golden": golden}
    label = _pick(row, LABEL_KEYS)
    answer = _pick(row, ANSWER_KEYS)
    if label is not None and answer is None:
        text = _pick(row, TEXT_KEYS)
        if text is None:
            raise ValueError("a label row needs a 'text' (or 'question') field")
        return {"messages": [{"role": "user", "content": text}], "answer": None, "label": label, "golden": golden}
    question = _pick(row, QUESTION_KEYS)
    if question is None or answer is None:
        raise ValueError("needs 'question' and 'answer' (or 'text' and 'label'), non-empty")
    return {"messages": [{"role": "user", "content": question}], "answer": answer, "label": None, "golden": golden}


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) pairs; JSON syntax errors become ImportFileError with the line."""
    if not path.is_file():
        raise ImportFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    if suffix in (".jsonl", ".ndjson", ".json"):
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                return [(i + 1, r) for i, r in enumerate(json.loads(text))]
            except json.JSONDecodeError as exc:
                raise ImportFileError(f"{path}: invalid JSON: {exc}") from exc
        rows, errors = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                errors.append(f"line {lineno}: invalid JSON ({exc.msg})")
        if errors:
            raise ImportFileError(f"{path}: {len(errors)} bad row(s), nothing imported:\n  " + "\n  ".join(errors))
        return rows
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise ImportFileError(f"{path}: empty CSV (no header row)")
        return [(i + 2, dict(r)) for i, r in enumerate(reader)]
    raise ImportFileError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, .csv or .tsv")


def import_file(session: Session, path: Path | str, *, source: str = "import", memory=None) -> ImportResult:
    """Import every row or none; with `memory`, imported answers are also remembered."""
    path = Path(path)
    rows = read_rows(path)
    parsed, errors = [], []
    for lineno, row in rows:
        try:
            parsed.append((lineno, parse_row(row)))
        except ValueError as exc:
            errors.append(f"line {lineno}: {exc}")
    if errors:
        raise ImportFileError(f"{path}: {len(errors)} bad row(s), nothing imported:\n  " + "\n  ".join(errors))
    if not parsed:
        raise ImportFileError(f"{path}: no rows to import")
    result = ImportResult(rows=len(parsed))
    rows = []
    for lineno, item in parsed:
        row, created = upsert_example(
            session, messages=item["messages"], answer=item["answer"], label=item["label"], source=source,
            provenance={"file": path.name, "line": lineno}, golden=item["golden"])
        rows.append(row)
        result.created += created
        result.existing += not created
        result.golden += item["golden"]
    if memory is not None:
        result.remembered = remember_examples(session, memory, rows)
    return result


def remember_examples(session: Session, memory, rows) -> int:
    """Imported answers join the correction memory (curated: visible everywhere)."""
    from flywheel.embedding import to_bytes
    from flywheel.prompt import normalize
    from store.memory import upsert_memory_item

    # redacted as the memory's own writes (Memory.remember) and the training data are
    items = [(r, redact(normalize(r.messages[-1]["content"])), redact(r.answer.strip()))
             for r in rows if r.answer and r.label is None]
    items = [(r, q, a) for r, q, a in items if q]
    if not items or not memory.settings.memory:
        return 0
    from flywheel.memory import item_vectors

    vectors = item_vectors(memory.embedder, [(q, a) for _r, q, a in items])
    for (row, question, answer), vector in zip(items, vectors):
        upsert_memory_item(session, key=f"example:{row.id}", question=question, answer=answer,
                           source="import", author=None, channel=None, visible_in=None, vector=to_bytes(vector))
    return len(items)
