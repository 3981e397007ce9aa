"""Build a dataset snapshot from the store: derive examples from feedback, clean, redact,
dedupe (exact and near), split deterministically, export, and record it.

Same inputs and parameters give the same content hash and the same files; a rebuild with
nothing new reuses the recorded snapshot."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, List, Value, disable_progress_bars
from sqlmodel import Session

from flywheel.logs import get_logger
from flywheel.prompt import PromptSettings, build_messages, normalize
from flywheel.redact import redact
from store.datasets import record_snapshot, snapshot_by_hash
from store.examples import list_examples, set_splits
from store.models import DOCUMENT_EXAMPLE_SOURCE, DatasetSnapshot, Example
from trainer.augment import template_paraphrases
from trainer.clean import normalize_for_hash
from trainer.dedup import NearDupIndex, exact_key
from trainer.settings import TrainerSettings
from trainer.targets import derive_examples

log = get_logger("trainer.dataset")
disable_progress_bars()
# train: what the model learns; eval: never-taught items (regression check only); golden: must
# stay right; recall: taught facts asked in held-out words; general: questions any model knows;
# rejected: answers voted down with nothing better taught (no SFT target; KTO's undesirable ones).
SPLITS = ("train", "eval", "golden", "recall", "general", "rejected")
STORED_SPLITS = ("train", "eval", "golden")  # the ones an Example row can be in
# Curated: imported, or a document's question a reviewer approved (store/docquestions.py); an
# admin stands behind it.
CURATED_SOURCES = ("import", DOCUMENT_EXAMPLE_SOURCE)
# What people taught: always trained on, never withheld for evaluation.
TAUGHT_SOURCES = ("correction", *CURATED_SOURCES, "shortcut")
# Which example wins when several give different targets for the same context: first who stands
# behind it (an admin's import, correction or golden item outranks anyone else's correction), then
# the source, then the newest.
SOURCE_PRIORITY = {"correction": 5, "import": 4, DOCUMENT_EXAMPLE_SOURCE: 4, "shortcut": 3, "label": 3,
                   "feedback": 2, "augmented": 1}


def rank(item: dict) -> tuple:
    by_admin = item["source"] in CURATED_SOURCES or item["golden"] or item.get("by_admin", False)
    return (by_admin, SOURCE_PRIORITY.get(item["source"], 0), item["updated"], item["example_id"])
FEATURES = Features({
    "example_id": Value("int64"),
    "messages": List({"role": Value("string"), "content": Value("string")}),
    "answer": Value("string"),
    "label": Value("string"),
    "rejected_answer": Value("string"),
    "source": Value("string"),
    "golden": Value("bool"),
    "augmented": Value("bool"),
    "parent": Value("int64"),  # the taught item a paraphrase was made from
})


def label_system_prompt(labels: list[str]) -> str:
    return "Classify the user's message. Answer with exactly one of these labels: " + ", ".join(labels) + "."


@dataclass
class Snapshot:
    """A built dataset: the DatasetDict, the recorded row and what happened on the way."""

    dataset: DatasetDict
    row: DatasetSnapshot
    counts: dict
    reused: bool = False
    derivation: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return Path(self.row.path)


def hash_split(question: str, eval_fraction: float) -> str:
    """The split is a function of the normalized question alone: an eval item stays eval forever."""
    digest = hashlib.sha256(("split\x1f" + normalize_for_hash(question)).encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"


class _TooLong(Exception):
    """A text over `max_chars`: its item is dropped before redaction ever sees it."""


def _clean_example(ex: Example, prompt: PromptSettings, redactions: Counter, max_chars: int) -> dict | None:
    def fix(text):
        if text and len(text) > max_chars:
            raise _TooLong
        return redact(text, redactions) if text else text

    def fix_target(text):
        return fix(normalize(text, bot_user_id=prompt.bot_user_id)) if text else None

    def fix_rejected(text):  # a pair's rejected side: an over-long one is left out, not the item
        try:
            return fix_target(text)
        except _TooLong:
            return None

    # Labels get their own system prompt (the label list) below; answers get production's.
    messages = build_messages(ex.messages, prompt if ex.label is None else _bare(prompt), clean=fix)
    answer = fix_target(ex.answer) if ex.answer is not None else None
    label = (ex.label or "").strip() or None
    rejected_only = ex.source == "rejected"  # only the voted-down answer: over-long, it is dropped whole
    rejected = fix_target(ex.rejected_answer) if rejected_only else fix_rejected(ex.rejected_answer)
    target = rejected if rejected_only else (label or answer)
    if not messages or messages[-1]["role"] != "user" or not target:
        return None
    return {"example_id": ex.id, "messages": messages, "answer": answer, "label": label,
            "rejected_answer": rejected, "source": ex.source, "golden": bool(ex.golden),
            "augmented": ex.source == "augmented", "parent": (ex.provenance or {}).get("augmented_from"),
            "updated": ex.updated_at.isoformat() if ex.updated_at else "",
            "by_admin": bool((ex.provenance or {}).get("by_admin"))}


def _bare(prompt: PromptSettings) -> PromptSettings:
    return prompt.model_copy(update={"system_prompt": None})


def _with_question(item: dict, question: str, **extra) -> dict:
    """The same item asked in other words (same context and answer)."""
    return {**item, "messages": [*item["messages"][:-1], {"role": "user", "content": question}], **extra}


def _too_long(item: dict, max_chars: int) -> bool:
    texts = [m["content"] for m in item["messages"]] + [item["answer"] or ""]
    return any(len(t) > max_chars for t in texts)


def _text(item: dict) -> str:
    return item["messages"][-1]["content"] + "\n" + (item["answer"] or item["label"] or "")


def select_items(examples: list[Example], settings: TrainerSettings, prompt: PromptSettings,
                 general: list[dict] | None = None) -> tuple[dict[str, list[dict]], Counter, list[str]]:
    """Clean, redact, drop, dedupe, split and augment; returns the items per split and the counts.
    Everything people taught trains; only never-taught items (voted-up answers) are held out."""
    counts: Counter = Counter()
    items, redactions = _cleaned(examples, prompt, settings.max_chars, counts)
    items, rejected = _set_rejected_apart(items, counts)
    winners = _one_per_context(items, counts)
    labels = _labels_as_answers(winners)
    _assign_splits(winners, settings.eval_fraction)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    out["rejected"] = rejected
    # Near duplicates: within the training set keep the first of each never-taught group (what people
    # taught always stays); a never-taught eval item like a training item is dropped (it would
    # measure memorization, and its twin trains anyway).
    train_index = _fill_train(out, winners, settings, counts)
    _fill_eval(out, winners, train_index, settings, counts)
    taught = _augment_taught(out, settings, counts)
    out["general"] = _general_items(general or [], prompt)
    _count_splits(out, counts, len(taught), redactions)
    return out, counts, labels


def _cleaned(examples: list[Example], prompt: PromptSettings, max_chars: int,
             counts: Counter) -> tuple[list[dict], Counter]:
    """Each example cleaned and redacted, or dropped (empty, too long); and the redactions made
    in the items kept."""
    redactions: Counter = Counter()
    items = []
    for ex in examples:
        found: Counter = Counter()  # tallied only for items kept
        try:
            item = _clean_example(ex, prompt, found, max_chars)
        except _TooLong:
            counts["dropped_too_long"] += 1
            continue
        if item is None:
            counts["dropped_empty"] += 1
        elif _too_long(item, max_chars):
            counts["dropped_too_long"] += 1
        else:
            redactions.update(found)
            items.append(item)
    return items, redactions


def _set_rejected_apart(items: list[dict], counts: Counter) -> tuple[list[dict], list[dict]]:
    """(the items with a target, the rejected ones kept)."""
    # Voted down with nothing better taught: kept apart (one per context and answer), unless someone
    # taught an answer for the same context (then that item's pair says it better).
    rejected = [it for it in items if it["source"] == "rejected"]
    items = [it for it in items if it["source"] != "rejected"]
    taught_contexts = {json.dumps(it["messages"], sort_keys=True) for it in items if it["answer"]}
    seen_rejected: set[str] = set()
    out_rejected = []
    for it in rejected:
        key = json.dumps([it["messages"], normalize_for_hash(it["rejected_answer"])], sort_keys=True)
        if key in seen_rejected or json.dumps(it["messages"], sort_keys=True) in taught_contexts:
            counts["rejected_superseded"] += 1
            continue
        seen_rejected.add(key)
        out_rejected.append(it)
    return items, out_rejected


def _one_per_context(items: list[dict], counts: Counter) -> list[dict]:
    # Exact duplicates and conflicts: one item per (kind, normalized context); the best source wins.
    groups: dict[str, list[dict]] = {}
    for item in items:
        kind = "label" if item["label"] is not None and item["answer"] is None else "answer"
        key = exact_key(kind, *[f"{m['role']}:{m['content']}" for m in item["messages"]])
        groups.setdefault(key, []).append(item)
    winners = []
    for group in groups.values():
        group.sort(key=rank, reverse=True)
        best = dict(group[0])
        best["golden"] = any(it["golden"] for it in group)
        counts["exact_duplicates"] += len(group) - 1
        winners.append(best)
    winners.sort(key=lambda it: (-SOURCE_PRIORITY.get(it["source"], 0), it["example_id"]))
    return winners


def _labels_as_answers(winners: list[dict]) -> list[str]:
    """The label set, sorted; each label item turned into an answer item in place."""
    # Labels become answers with a system prompt listing the label set, so one SFT recipe trains both.
    labels = sorted({it["label"] for it in winners if it["label"] is not None and it["answer"] is None})
    for it in winners:
        if it["label"] is not None and it["answer"] is None:
            it["messages"] = [{"role": "system", "content": label_system_prompt(labels)}, *it["messages"]]
            it["answer"] = it["label"]
            it["is_label"] = True
    return labels


def _assign_splits(winners: list[dict], eval_fraction: float) -> None:
    """Taught items train; a paraphrase trains with its parent (None: the parent is gone); the
    others are split by their question's hash."""
    by_id = {it["example_id"]: it for it in winners}
    for it in winners:
        if it["augmented"]:
            parent = by_id.get(it["parent"])
            it["split"] = "train" if parent is not None else None
        elif it["source"] in TAUGHT_SOURCES or it["golden"]:
            it["split"] = "train"
        else:
            it["split"] = hash_split(it["messages"][-1]["content"], eval_fraction)


def _fill_train(out: dict[str, list[dict]], winners: list[dict], settings: TrainerSettings,
                counts: Counter) -> NearDupIndex:
    """The training (and training-side golden) items; returns the index of their texts."""
    train_index = NearDupIndex(settings.near_dup_threshold, settings.minhash_perms)
    for it in winners:
        if it["split"] is None:
            counts["dropped_orphan_augmented"] += 1
            continue
        if it["split"] != "train":
            continue
        text = _text(it)
        taught = it["source"] in TAUGHT_SOURCES or it["golden"] or it["augmented"]
        if not taught and train_index.matches(text):
            counts["near_duplicates"] += 1
            continue
        train_index.add(str(it["example_id"]), text)
        if it["golden"]:
            out["golden"].append(it)
            if not settings.train_on_golden:
                continue
        out["train"].append(it)
    return train_index


def _fill_eval(out: dict[str, list[dict]], winners: list[dict], train_index: NearDupIndex,
               settings: TrainerSettings, counts: Counter) -> None:
    eval_index = NearDupIndex(settings.near_dup_threshold, settings.minhash_perms)
    for it in winners:
        if it["split"] != "eval":
            continue
        text = _text(it)
        if train_index.matches(text) or eval_index.matches(text):
            counts["near_duplicates"] += 1
            continue
        eval_index.add(str(it["example_id"]), text)
        out["eval"].append(it)
        if it["golden"]:
            out["golden"].append(it)


def _augment_taught(out: dict[str, list[dict]], settings: TrainerSettings, counts: Counter) -> list[dict]:
    """The taught training items, each added in template paraphrases to train and to recall."""
    # Taught answers: learned in a few more phrasings, and recalled in held-out ones.
    taught = [it for it in out["train"] if not it["augmented"] and (it["source"] in TAUGHT_SOURCES or it["golden"])]
    for it in taught:
        question = it["messages"][-1]["content"]
        for alt in template_paraphrases(question, settings.augment_templates, "train"):
            out["train"].append(_with_question(it, alt, augmented=True, parent=it["example_id"]))
            counts["augmented_templates"] += 1
        for alt in template_paraphrases(question, settings.recall_paraphrases, "recall"):
            out["recall"].append(_with_question(it, alt, augmented=True, parent=it["example_id"]))
    return taught


def _general_items(general: list[dict], prompt: PromptSettings) -> list[dict]:
    """General questions ({"question", "answer"}) as items, prompted as production prompts."""
    return [{"example_id": -1, "messages": build_messages([{"role": "user", "content": row["question"]}], prompt),
             "answer": row["answer"], "label": None, "rejected_answer": None, "source": "general",
             "golden": False, "augmented": False, "parent": None}
            for row in general]


def _count_splits(out: dict[str, list[dict]], counts: Counter, n_taught: int, redactions: Counter) -> None:
    """Each split sorted by example id, and the tallies of what was built."""
    counts["taught"] = n_taught
    for split in SPLITS:
        out[split].sort(key=lambda it: it["example_id"])
        counts[split] = len(out[split])
    counts["augmented"] = sum(it["augmented"] for it in out["train"])
    counts["label_items"] = sum(it["label"] is not None for s in ("train", "eval") for it in out[s])
    counts["never_taught"] = counts["eval"]
    counts.update({f"redacted_{k.lower()}": v for k, v in redactions.items()})


def content_hash(items: dict[str, list[dict]], params: dict) -> str:
    """Identity of a snapshot: its items' content (not row ids or times) and the build params."""
    payload = {s: [{k: it[k] for k in ("messages", "answer", "label", "rejected_answer", "golden", "augmented")}
                   for it in items[s]] for s in SPLITS}
    blob = json.dumps({"items": payload, "params": params}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_params(settings: TrainerSettings) -> dict:
    prompt = PromptSettings()
    return {"eval_fraction": settings.eval_fraction, "near_dup_threshold": settings.near_dup_threshold,
            "minhash_perms": settings.minhash_perms, "max_chars": settings.max_chars,
            "train_on_golden": settings.train_on_golden, "augment": settings.augment,
            "augment_templates": settings.augment_templates, "recall_paraphrases": settings.recall_paraphrases,
            "prompt": prompt.model_dump()}


def to_dataset(items: dict[str, list[dict]]) -> DatasetDict:
    cols = list(FEATURES)
    return DatasetDict({s: Dataset.from_dict({k: [it[k] for it in items[s]] for k in cols}, features=FEATURES)
                        for s in SPLITS})


def write_snapshot(ds: DatasetDict, target: Path, manifest: dict) -> None:
    """Write into a temporary sibling and rename, so a crash never leaves a half snapshot."""
    if (target / "manifest.json").is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for split in SPLITS:
            export_jsonl(ds[split], tmp / f"{split}.jsonl")
        # Empty splits are left out: datasets cannot load a zero-shard split back.
        DatasetDict({k: v for k, v in ds.items() if v.num_rows}).save_to_disk(str(tmp / "hf"))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def export_jsonl(split: Dataset, path: Path) -> int:
    """Chat-format JSONL (messages ending with the assistant's target), the common fine-tune format;
    a rejected-only item has no target: its messages end with the question."""
    with path.open("w", encoding="utf-8") as fh:
        for row in split:
            target = [{"role": "assistant", "content": row["answer"]}] if row["answer"] else []  # labels: set above
            record = {"messages": [*row["messages"], *target]}
            for key in ("label", "rejected_answer", "source", "golden", "augmented", "example_id"):
                if row[key] is not None:
                    record[key] = row[key]
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(split)


def shared_examples(session: Session) -> list[Example]:
    """What may train and evaluate the model everyone uses: examples the whole workspace may see
    (store.channels decides), and paraphrases only of those (a paraphrase of something that has
    since become private goes with it)."""
    rows = list_examples(session, everyone_may_see=True)
    ids = {ex.id for ex in rows}
    return [ex for ex in rows if ex.source != "augmented" or ex.provenance.get("augmented_from") in ids]


def build_snapshot(session: Session, settings: TrainerSettings, *, derive: bool = True,
                   augmenter=None) -> Snapshot:
    """Everything from store rows to a recorded, exported snapshot."""
    prompt = PromptSettings()
    derivation = derive_examples(session, admins=frozenset(settings.admins),
                                 context_turns=prompt.context_max_messages).__dict__ if derive else {}
    if settings.augment and augmenter is not None:
        augmenter(session, settings)
    items, counts, labels = select_items(shared_examples(session), settings, prompt, general=general_questions())
    params = build_params(settings)
    digest = content_hash(items, params)
    counts = {**dict(sorted(counts.items())), "labels": labels}
    ds = to_dataset(items)
    existing = snapshot_by_hash(session, digest)
    target = Path(settings.data_dir).resolve() / "snapshots" / digest[:16]
    manifest = {"content_hash": digest, "counts": counts, "params": params}
    write_snapshot(ds, target, manifest)
    set_splits(session, {it["example_id"]: s for s in STORED_SPLITS for it in items[s] if not it["augmented"]})
    if existing is not None and Path(existing.path).resolve() == target:
        log.info("dataset unchanged", snapshot=existing.id, hash=digest[:12])
        return Snapshot(ds, existing, counts, reused=True, derivation=derivation)
    row = record_snapshot(session, content_hash=digest, counts=counts, params=params, path=str(target))
    log.info("dataset built", snapshot=row.id, hash=digest[:12], train=counts["train"], eval=counts["eval"],
             golden=counts["golden"])
    return Snapshot(ds, row, counts, derivation=derivation)


def general_questions() -> list[dict]:
    """Questions any decent model answers (capitals, sums, colours): no team fact may make the
    model worse at these. Shipped with the trainer; {"question", "answer"} per line."""
    from importlib import resources

    text = resources.files("trainer").joinpath("data/general_questions.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_snapshot(row: DatasetSnapshot) -> DatasetDict:
    """The saved DatasetDict with all three splits (empty ones recreated)."""
    from datasets import load_from_disk

    loaded = load_from_disk(str(Path(row.path) / "hf"))
    empty = Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)
    return DatasetDict({s: loaded[s] if s in loaded else empty for s in SPLITS})
