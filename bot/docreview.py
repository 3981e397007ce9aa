"""Questions generated from documents (`flywheel docs questions --generate`, trainer/docquestions.py)
in the review queue of the admin channel: one post per document with what waits (each question,
its short answer and its section, with Approve / Edit / Reject) and "Approve all" for the whole
document. The report poller posts them (under its lease, so one replica does); a decision is the
store's (store/docquestions.py: audited, the example written with it), then the memory learns an
approved pair and the post is drawn again from the store. A document imported for one channel
only is announced without its text (as a private conversation's correction is), and reviewed
with `flywheel docs questions ID` / `flywheel docs approve ID`. Only admins and reviewers decide;
every refused attempt is audited."""
from __future__ import annotations

import json
from collections import defaultdict

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot.blocks import mrkdwn, plain
from bot.review import NOT_A_REVIEWER
from bot.settings import BotSettings
from bot.slack_text import escape_within
from flywheel.embedding import EmbedderError
from flywheel.logs import get_logger
from flywheel.memory import Memory
from store.audit import record_audit
from store.db import session_scope
from store.docquestions import (
    approve_document,
    decide_question,
    get_question,
    mark_posted,
    memory_item,
    pending_questions,
    posted_questions,
    with_sections,
)
from store.documents import get_document
from store.errors import StoreError
from store.models import DocQuestion, DocQuestionState, Document

log = get_logger("bot.docreview")
APPROVE, EDIT, REJECT, APPROVE_ALL = "docq_approve", "docq_edit", "docq_reject", "docq_approve_all"
ACTIONS = (APPROVE, EDIT, REJECT, APPROVE_ALL)
EDIT_VIEW = "docq_edit_modal"
QUESTION_BLOCK, ANSWER_BLOCK, TEXT_INPUT = "docq_question", "docq_answer", "text"
LISTED = 15  # two blocks each, with the head and the buttons well inside Slack's 50 a message
DECIDED = {DocQuestionState.approved: ":white_check_mark: approved", DocQuestionState.rejected: ":no_entry_sign: rejected",
           DocQuestionState.stale: ":hourglass: stale: its section changed since"}


# -- the post --------------------------------------------------------------------------------------
def post_blocks(doc: Document, items: list[tuple[DocQuestion, str]]) -> list[dict]:
    """A document's questions as the admin channel shows them: each with its answer and section,
    its buttons while it waits, who decided once decided; "Approve all" while any waits."""
    waiting = sum(row.status == DocQuestionState.pending for row, _t in items)
    head = (f"*Questions from the document _{escape_within(doc.title, 200)}_* ({len(items)}, {waiting} waiting): "
            "generated from its sections; approved, each teaches the memory and the next training.")
    out = [{"type": "section", "text": mrkdwn(head)}]
    for row, title in items[:LISTED]:
        out.append({"type": "section", "text": mrkdwn(
            f"*Q:* {escape_within(row.question, 500)}\n*A:* {escape_within(row.answer, 1000)}\n"
            f"_{escape_within(title, 300)}_")})
        out.append(_row_state(row))
    if len(items) > LISTED:
        out.append({"type": "context", "elements": [mrkdwn(
            f"{len(items) - LISTED} more: `flywheel docs questions {doc.id}` lists them; Approve all takes them too")]})
    if waiting:
        out.append({"type": "actions", "block_id": f"docq_all_{doc.id}", "elements": [
            {"type": "button", "action_id": APPROVE_ALL, "text": plain(f"Approve all {waiting}"), "style": "primary",
             "value": str(doc.id)}]})
    return out


def _row_state(row: DocQuestion) -> dict:
    if row.status != DocQuestionState.pending:
        by = f" by <@{row.decided_by}>" if row.decided_by else ""
        edited = " (edited)" if row.edited else ""
        return {"type": "context", "elements": [mrkdwn(f"{DECIDED.get(row.status, row.status)}{edited}{by}")]}
    value = str(row.id)
    return {"type": "actions", "block_id": f"docq_{value}", "elements": [
        {"type": "button", "action_id": APPROVE, "text": plain("Approve"), "style": "primary", "value": value},
        {"type": "button", "action_id": EDIT, "text": plain("Edit"), "value": value},
        {"type": "button", "action_id": REJECT, "text": plain("Reject"), "style": "danger", "value": value}]}


def post_waiting(settings: BotSettings, client: WebClient) -> int:
    """Post each document's newly waiting questions to the admin channel, one post per document
    (a document visible in one channel only: how many, without its text); how many posts."""
    with session_scope() as s:
        groups: dict[int, list[DocQuestion]] = defaultdict(list)
        for row in pending_questions(s, unposted=True):
            groups[row.document_id].append(row)
        work = [(get_document(s, doc_id), with_sections(s, rows)) for doc_id, rows in groups.items()]
    posted = 0
    for doc, items in work:
        text = f"{len(items)} questions from the document {doc.title} wait for review"
        if doc.visible_in is None:
            kwargs = {"blocks": post_blocks(doc, items), "text": text}
        else:
            kwargs = {"text": f"{len(items)} questions from a document visible only in <#{doc.visible_in}> wait "
                              f"for review: `flywheel docs questions {doc.id}` shows them to whoever runs it"}
        try:
            resp = client.chat_postMessage(channel=settings.admin_channel, **kwargs)
        except SlackApiError as exc:  # they stay unposted: the next round tries again
            log.warning("cannot post the document's questions", document=doc.id, error=exc.response.get("error"))
            continue
        with session_scope() as s:
            mark_posted(s, [row.id for row, _t in items], resp["ts"])
        posted += 1
    return posted


# -- decisions -------------------------------------------------------------------------------------
class DocReview:
    def __init__(self, settings: BotSettings, memory: Memory) -> None:
        self.settings, self.memory = settings, memory

    def on_button(self, ack, body: dict, client: WebClient, respond) -> None:
        ack()
        action, user = body["actions"][0], body["user"]["id"]
        verb = {APPROVE: "approve", REJECT: "reject", EDIT: "edit", APPROVE_ALL: "approve"}[action["action_id"]]
        try:
            target = int(action.get("value") or "")
        except ValueError:
            respond(text=":x: This review item is not valid.", response_type="ephemeral", replace_original=False)
            return
        if not self.settings.is_reviewer(user):
            self._refused(user, verb, target, action["action_id"] == APPROVE_ALL)
            respond(text=NOT_A_REVIEWER, response_type="ephemeral", replace_original=False)
            return
        if action["action_id"] == EDIT:
            self._open_editor(body, client, respond, target)
            return
        decided = self.decide(user, target, action["action_id"])
        if isinstance(decided, str):
            respond(text=decided, response_type="ephemeral", replace_original=False)
            return
        self.follow_up(client, *decided)

    def decide(self, user: str, target: int, action_id: str, *, question: str | None = None,
               answer: str | None = None) -> tuple[Document, list[DocQuestion]] | str:
        """Decide a question (or with APPROVE_ALL a document) in the store: the document and the
        questions decided, or what went wrong."""
        try:
            with session_scope() as s:
                if action_id == APPROVE_ALL:
                    doc, rows = approve_document(s, target, actor=user)
                else:
                    doc, row = decide_question(s, target, actor=user, approve=action_id == APPROVE,
                                               question=question, answer=answer)
                    rows = [row]
        except StoreError as exc:
            return f":x: {exc}"
        log.info("document questions decided", document=doc.id, questions=len(rows), action=action_id, by=user)
        return doc, rows

    def follow_up(self, client: WebClient, doc: Document, rows: list[DocQuestion]) -> None:
        """After Slack has its ack (slow): the memory learns what was approved, the post is drawn again."""
        if rows[0].status == DocQuestionState.approved:
            self._remember(doc, rows)
        self._redraw(client, doc, {row.review_ts for row in rows if row.review_ts})

    def _remember(self, doc: Document, rows: list[DocQuestion]) -> None:
        if not self.memory.settings.memory:
            return
        try:
            with session_scope() as s:
                for row in rows:
                    self.memory.remember(s, **memory_item(row, doc))
        except EmbedderError as exc:  # approved and in the training data; the memory could not learn them
            log.error("approved document questions not remembered", document=doc.id, error=str(exc))

    def _redraw(self, client: WebClient, doc: Document, posts: set[str]) -> None:
        for ts in posts:
            with session_scope() as s:
                items = with_sections(s, posted_questions(s, ts))
            try:
                client.chat_update(channel=self.settings.admin_channel, ts=ts, blocks=post_blocks(doc, items),
                                   text=f"Questions from the document {doc.title}")
            except SlackApiError as exc:  # the decision stands; only the post stays as it was
                log.info("could not update the document's questions post", error=exc.response.get("error"))

    def _refused(self, user: str, verb: str, target: int, whole: bool) -> None:
        with session_scope() as s:
            record_audit(s, actor=user, action=f"docquestion.{verb}", outcome="refused",
                         target=f"document {target}" if whole else f"question {target}",
                         detail={"reason": "not a reviewer"})

    # -- the edit modal ------------------------------------------------------------------------
    def _open_editor(self, body: dict, client: WebClient, respond, question_id: int) -> None:
        with session_scope() as s:
            row = get_question(s, question_id)
        if row is None or row.status != DocQuestionState.pending:
            respond(text=f":x: question {question_id} does not wait for review", response_type="ephemeral",
                    replace_original=False)
            return
        try:
            client.views_open(trigger_id=body["trigger_id"], view=edit_modal(row))
        except SlackApiError as exc:
            log.error("cannot open the document question editor", error=exc.response.get("error"))

    def on_edit_submit(self, ack, body: dict, view: dict, client: WebClient) -> None:
        values = (view.get("state") or {}).get("values") or {}
        question, answer = (((values.get(block) or {}).get(TEXT_INPUT) or {}).get("value")  # None: not there
                            for block in (QUESTION_BLOCK, ANSWER_BLOCK))
        user = body["user"]["id"]
        try:
            question_id = int(json.loads(view.get("private_metadata") or "{}")["question_id"])
        except (KeyError, TypeError, ValueError):
            ack(response_action="errors", errors={ANSWER_BLOCK: "This review item is not valid."})
            return
        if not self.settings.is_reviewer(user):
            self._refused(user, "approve", question_id, False)
            ack(response_action="errors", errors={ANSWER_BLOCK: NOT_A_REVIEWER[:150]})
            return
        decided = self.decide(user, question_id, APPROVE, question=question, answer=answer)
        if isinstance(decided, str):
            ack(response_action="errors", errors={ANSWER_BLOCK: decided.removeprefix(":x: ")[:150]})
            return
        ack()  # within Slack's 3 s: the decision is stored; the memory and the post come next
        self.follow_up(client, *decided)


def edit_modal(row: DocQuestion) -> dict:
    """Edit a generated question and its answer, then approve them."""
    def field(block: str, label: str, value: str, multiline: bool) -> dict:
        return {"type": "input", "block_id": block, "label": plain(label),
                "element": {"type": "plain_text_input", "action_id": TEXT_INPUT, "multiline": multiline,
                            "max_length": 3000, "initial_value": value[:3000]}}

    return {"type": "modal", "callback_id": EDIT_VIEW, "title": plain("Edit and approve"),
            "submit": plain("Approve"), "close": plain("Cancel"),
            "private_metadata": json.dumps({"question_id": row.id}),
            "blocks": [field(QUESTION_BLOCK, "The question", row.question, False),
                       field(ANSWER_BLOCK, "Its answer", row.answer, True)]}
