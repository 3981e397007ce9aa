"""Turn what people said about the bot's answers into Example rows.

The rules (per answer message, over live, non-retracted feedback):
Who is an admin is decided here, at training time, from FLYWHEEL_ADMINS (`admins`), never from
what a vote recorded when it was cast: a removed admin's old votes count as anyone's.
- Review (FLYWHEEL_REVIEW_CORRECTIONS, store.review): a correction, a 👍 or an "Add to training data"
  waiting for a reviewer, or rejected by one, counts for nothing here; a 👍 or an "Add to
  training data" by someone who is an admin now counts at once. Votes still count as signals
  elsewhere (reports, the watch), only not as targets.
- Votes (reactions and buttons, "up"/"down"): when any admin voted, the admins' net decides;
  otherwise everyone's net. Net > 0: the answer is a positive target; net < 0: it is never a
  target and is kept as a rejected answer; net == 0 (mixed): nothing is derived from votes.
- Corrections beat everything: an admin's correction beats a user's, then the newest one wins.
  The bot's answer becomes the rejected answer of a corrected item.
- "Add to training data" (shortcut "include") on an answer makes it a target unless its net vote
  is negative; on a user message, the next bot answer in the thread is the target.
- Golden: only an admin's "golden" mark makes the item golden (its best target: correction, else
  the answer when its net is not negative). A user's 👎 + correction never does: golden items gate
  every later model, so only admins decide what they are.
- Labels classify the question (the user message an answer replied to, or the labeled message
  itself): admins' labels win; otherwise the majority; a tie goes to the newest label.
Examples derived earlier from a message whose target has since changed are excluded, so a
changed vote never leaves a stale target behind.
Every derived example carries where it may be seen (store.channels.training_scope, refreshed on
each derivation): only what the whole workspace may see trains the shared model.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sqlmodel import Session

from flywheel.logs import get_logger
from store.channels import training_scope
from store.conversations import conversation_messages
from store.examples import exclude_examples, list_examples, set_example_status, upsert_example
from store.feedback import active_feedback
from store.models import ExampleStatus, Feedback, FeedbackKind, Message, Role
from store.review import VOTE_KINDS, held_back

log = get_logger("trainer.targets")
DERIVED_SOURCES = ("feedback", "correction", "shortcut", "label", "rejected")
STALE = "stale: its feedback changed"


@dataclass
class Derivation:
    created: int = 0
    existing: int = 0
    excluded: int = 0
    rejected_only: int = 0  # net-negative answers without a correction (stored for KTO only)
    skipped: list[str] = field(default_factory=list)


def net_votes(votes: list[Feedback], admins: frozenset[str]) -> int:
    """Admins decide when they voted; otherwise everyone's up minus down."""
    admin = [v for v in votes if v.user in admins]
    counted = admin or votes
    return sum(1 if v.value == "up" else -1 if v.value == "down" else 0 for v in counted)


def best_correction(corrections: list[Feedback], admins: frozenset[str]) -> Feedback | None:
    usable = [c for c in corrections if (c.correction or "").strip()
              and not held_back(c)]
    if not usable:
        return None
    return max(usable, key=lambda c: (c.user in admins, c.updated_at, c.id))


def reviewed(rows: list[Feedback], admins: frozenset[str]) -> list[Feedback]:
    """The votes and "Add to training data" that may make a target: an admin's at once, anyone
    else's unless it waits for a reviewer or was rejected."""
    return [r for r in rows if r.user in admins or not held_back(r)]


def winning_label(labels: list[Feedback], admins: frozenset[str]) -> str | None:
    if not labels:
        return None
    admin = [lab for lab in labels if lab.user in admins]
    pool = admin or labels
    counts = Counter(lab.value for lab in pool)
    top = max(counts.values())
    tied = {v for v, n in counts.items() if n == top}
    newest = max((lab for lab in pool if lab.value in tied), key=lambda lab: (lab.updated_at, lab.id))
    return newest.value


def _as_turns(messages: list[Message]) -> list[dict]:
    """Stored turns as the prompt module reads them; failed answers (apologies) are not dialogue."""
    return [{"role": m.role, "content": m.text} for m in messages
            if m.role in (Role.user, Role.assistant) and not m.error]


def _context_for(thread: list[Message], answer: Message, turns: int) -> list[dict] | None:
    """The dialogue up to the question this answer replied to (ending with a user message)."""
    before = [m for m in thread if m.ts < answer.ts and m.id != answer.id and not m.error]
    while before and before[-1].role != Role.user:
        before.pop()
    if not before:
        return None
    return _as_turns(before[-turns:]) or None


def _question_of(thread: list[Message], msg: Message) -> Message | None:
    if msg.role == Role.user:
        return msg
    users = [m for m in thread if m.role == Role.user and m.ts < msg.ts]
    return users[-1] if users else None


def _next_answer(thread: list[Message], msg: Message) -> Message | None:
    later = [m for m in thread if m.ts > msg.ts]
    for m in later:
        if m.role == Role.assistant:
            return m
        if m.role == Role.user:
            return None
    return None


def derive_examples(session: Session, *, admins: frozenset[str], context_turns: int = 6) -> Derivation:
    """Upsert one Example per message that has a target (and one per labeled question); `admins`:
    the Slack user ids that are admins now (TrainerSettings.admins)."""
    result = Derivation()
    by_message, messages = _feedback_by_message(session)
    threads = _Threads(session)
    _shortcuts_to_answers(by_message, messages, threads, result)
    kept: set[str] = set()  # content hashes of examples that are current
    for mid in sorted(by_message):
        _derive_for_message(session, messages[mid], by_message[mid], threads.of(messages[mid]), admins,
                            context_turns, kept, result)
    _exclude_stale(session, kept, result)
    for reason in result.skipped:
        log.info("feedback skipped", reason=reason)
    return result


def _feedback_by_message(session: Session) -> tuple[dict[int, list[Feedback]], dict[int, Message]]:
    """The live feedback grouped by the message it is on, and those messages by id."""
    by_message: dict[int, list[Feedback]] = defaultdict(list)
    messages: dict[int, Message] = {}
    for fb, msg in active_feedback(session):
        by_message[fb.message_id].append(fb)
        messages[msg.id] = msg
    return by_message, messages


class _Threads:
    """Each conversation's messages, read from the store once."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.threads: dict[int, list[Message]] = {}

    def of(self, msg: Message) -> list[Message]:
        if msg.conversation_id not in self.threads:
            self.threads[msg.conversation_id] = conversation_messages(self.session, msg.conversation_id)
        return self.threads[msg.conversation_id]


def _shortcuts_to_answers(by_message: dict[int, list[Feedback]], messages: dict[int, Message], threads: _Threads,
                          result: Derivation) -> None:
    # A shortcut on a user message stands for "include the bot's reply to it".
    for mid, fbs in list(by_message.items()):
        msg = messages[mid]
        if msg.role == Role.user and any(f.kind == FeedbackKind.shortcut for f in fbs):
            reply = _next_answer(threads.of(msg), msg)
            if reply is None:
                result.skipped.append(f"message {mid}: 'add to training data' on a question with no bot answer")
                continue
            messages.setdefault(reply.id, reply)
            by_message[reply.id].extend(f for f in fbs if f.kind == FeedbackKind.shortcut)


def _derive_for_message(session: Session, msg: Message, fbs: list[Feedback], thread: list[Message],
                        admins: frozenset[str], context_turns: int, kept: set[str], result: Derivation) -> None:
    """The label example of a labeled message, and the answer example of a bot answer with a target."""
    mid = msg.id
    kinds = defaultdict(list)
    for f in fbs:
        kinds[f.kind].append(f)
    labels = kinds.get(FeedbackKind.label, [])
    if labels:
        _derive_label(session, thread, msg, labels, admins, kept, result)
    if msg.role != Role.assistant:
        return
    votes = reviewed([f for k in VOTE_KINDS for f in kinds.get(k, [])], admins)
    net = net_votes(votes, admins)
    correction = best_correction(kinds.get(FeedbackKind.correction, []), admins)
    shortcut = reviewed(kinds.get(FeedbackKind.shortcut, []), admins)
    golden_marks = [f for f in kinds.get(FeedbackKind.golden, []) if f.user in admins]
    if not (votes or correction or shortcut or golden_marks):
        return
    context = _context_for(thread, msg, context_turns)
    if context is None:
        result.skipped.append(f"message {mid}: no user question before this answer")
        return
    target = _target(msg, net, correction, bool(shortcut), bool(golden_marks), result)
    if target is None:
        return
    answer, source, rejected = target
    provenance = {"feedback_ids": sorted(f.id for f in fbs if f.kind != FeedbackKind.label),
                  "message_id": mid, "net_votes": net}
    if correction is not None:
        provenance["correction_by"] = correction.user
        provenance["by_admin"] = correction.user in admins
    row, created = upsert_example(session, messages=context, answer=answer, source=source,
                                  provenance=provenance, golden=bool(golden_marks), rejected_answer=rejected,
                                  message_id=mid, visible_in=training_scope(session, msg.channel))
    _count(session, row, created, kept, result)


def _target(msg: Message, net: int, correction: Feedback | None, shortcut: bool, golden: bool,
            result: Derivation) -> tuple[str | None, str, str | None] | None:
    """(answer, source, rejected answer) of a bot answer, or None when it has no target."""
    if correction is not None:
        answer = correction.correction.strip()
        # an apology (a failed answer) is not something the model said: no pair from it
        rejected = msg.text if msg.text.strip() != answer and not msg.error else None
        return answer, "correction", rejected
    if net > 0 or (shortcut and net == 0) or (golden and net >= 0):
        return msg.text, ("feedback" if net > 0 else "shortcut"), None
    if net < 0 and msg.text.strip() and not golden and not msg.error:
        # voted down, nothing better taught: no SFT target, but KTO learns it is undesirable
        result.rejected_only += 1
        return None, "rejected", msg.text
    if golden:
        result.skipped.append(f"message {msg.id}: marked golden but its answer is voted down and uncorrected")
    return None


def _exclude_stale(session: Session, kept: set[str], result: Derivation) -> None:
    """Derived examples whose target is no longer current are excluded."""
    stale = [ex.id for ex in list_examples(session, status=ExampleStatus.active)
             if ex.source in DERIVED_SOURCES and ex.message_id is not None and ex.content_hash not in kept]
    result.excluded = exclude_examples(session, stale, STALE)


def _count(session, row, created: bool, kept: set[str], result: Derivation) -> None:
    kept.add(row.content_hash)
    if row.status == ExampleStatus.excluded and row.provenance.get("excluded_reason") == STALE:
        set_example_status(session, row.id, ExampleStatus.active)  # its target came back
    result.created += created
    result.existing += not created


def _derive_label(session, thread, msg, labels, admins: frozenset[str], kept, result) -> None:
    label = winning_label(labels, admins)
    question = _question_of(thread, msg)
    if label is None or question is None:
        result.skipped.append(f"message {msg.id}: label without a question to classify")
        return
    row, created = upsert_example(
        session, messages=[{"role": "user", "content": question.text}], label=label, source="label",
        provenance={"feedback_ids": sorted(lab.id for lab in labels), "message_id": msg.id}, message_id=msg.id,
        visible_in=training_scope(session, msg.channel))
    _count(session, row, created, kept, result)
