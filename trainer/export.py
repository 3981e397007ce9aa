"""A dataset snapshot in the formats other fine-tuning tools read. Every format is written from
the snapshot's rows, so what leaves is exactly what trains here: cleaned, redacted, deduplicated,
with production's system prompt on top (the same prompt everywhere).

- `chat`: this project's JSONL: `messages` ending with the assistant's target, plus `label`,
  `rejected_answer`, `source`, `golden`, `augmented`, `example_id` where set.
- `openai`: OpenAI's chat fine-tuning JSONL: one `{"messages": [...]}` per line, roles
  system / user / assistant, the last message the assistant's target; nothing else on the line.
- `openai-preference`: OpenAI's preference (DPO) fine-tuning JSONL: `{"input": {"messages": [...]},
  "preferred_output": [assistant], "non_preferred_output": [assistant]}`, for every item where
  someone voted an answer down and taught a better one.
- `trl-dpo`: TRL's conversational preference format: `{"prompt": [...], "chosen": [assistant],
  "rejected": [assistant]}`, the same pairs.
- `trl-kto`: TRL's conversational unpaired preference format: `{"prompt": [...], "completion":
  [assistant], "label": true|false}`: every answer people taught or liked (true), every answer they
  voted down (false), with or without a better one taught (the `rejected` split holds the latter)."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from trainer.preference import is_pair, unpaired_answers

FORMATS = ("chat", "openai", "openai-preference", "trl-dpo", "trl-kto")
PREFERENCE_FORMATS = ("openai-preference", "trl-dpo")
META_KEYS = ("label", "rejected_answer", "source", "golden", "augmented", "example_id")


def _target(row: dict) -> str | None:
    """What the assistant should say: the answer, or for label items the label."""
    return row.get("answer") or row.get("label")


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def records(rows: Iterable[dict], fmt: str) -> Iterator[dict]:
    """Snapshot rows (dicts with messages, answer, label, rejected_answer, …) → records of `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    for row in rows:
        prompt = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        target = _target(row)
        if fmt == "trl-kto":
            yield from ({"prompt": prompt, "completion": _assistant(answer), "label": good}
                        for _m, answer, good in unpaired_answers([row]))
        elif fmt in PREFERENCE_FORMATS:
            if not is_pair(row):
                continue
            rejected = row["rejected_answer"]
            if fmt == "trl-dpo":
                yield {"prompt": prompt, "chosen": _assistant(row["answer"]), "rejected": _assistant(rejected)}
            else:
                yield {"input": {"messages": prompt}, "preferred_output": _assistant(row["answer"]),
                       "non_preferred_output": _assistant(rejected)}
        elif target:
            record = {"messages": [*prompt, *_assistant(target)]}
            if fmt == "chat":
                record.update({k: row[k] for k in META_KEYS if row.get(k) is not None})
            yield record


def write_format(snapshot_dir: Path, out: Path, fmt: str, splits: Iterable[str]) -> dict[str, int]:
    """One `{split}.jsonl` per split in `fmt`; returns the records written per split."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        src = snapshot_dir / f"{split}.jsonl"
        if not src.is_file():
            continue
        rows = (_snapshot_row(json.loads(line)) for line in src.read_text(encoding="utf-8").splitlines() if line)
        n = 0
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
            for record in records(rows, fmt):
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        counts[split] = n
    return counts


def _snapshot_row(record: dict) -> dict:
    """A snapshot's chat-format line back to a row: the last assistant message is the target (a
    rejected-only line ends with the question: no target)."""
    messages = record["messages"]
    row = {k: record.get(k) for k in META_KEYS}
    if messages and messages[-1]["role"] == "assistant":
        *prompt, target = messages
        row.update(messages=prompt, answer=None if record.get("label") else target["content"])
    else:
        row.update(messages=messages, answer=None)
    return row
