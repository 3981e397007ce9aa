"""The review queue in Slack. While review is on, what someone who is neither an admin nor a
reviewer teaches waits: a correction, a 👍 (the answer as written) and "Add to training data" (the
question and this answer). Each is posted to the admin channel with Approve / Edit / Reject (one
from a DM or a private channel is not: its text stays out of shared channels and reviewers see it
with `/flywheel review`, which only they can open). Approval puts it in the training data, and a
correction (or a reviewer's edit) in the memory too; every decision, and every refused attempt,
is audited. Until then a 👍 still counts as a signal in reports and the watch."""
from __future__ import annotations

from collections.abc import Callable

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient
from slack_sdk.webhook import WebhookClient

from bot import blocks, metrics
from bot.admin import Reply
from bot.feedback import Feedback
from bot.settings import BotSettings
from flywheel.logs import get_logger
from flywheel.prompt import normalize
from store.audit import record_audit
from store.conversations import previous_user_message
from store.db import session_scope
from store.errors import StoreError
from store.models import Feedback as FeedbackRow
from store.models import FeedbackKind, Message
from store.review import count_pending, decide_review, get_reviewable, pending_reviews, subject, waits_already

log = get_logger("bot.review")
LISTED = 8  # five blocks each: Slack takes at most 50 blocks in a message
NOT_A_REVIEWER = (":no_entry: Only Flywheel admins and reviewers can review what Flywheel learns. "
                  "This attempt was logged.")
# what each kind of item is called in the admin channel and the queue
WHAT = {"correction": "correction", "vote": "👍", "shortcut": "\"Add to training data\""}
TOLD = {  # what the author hears after a decision: (approved, rejected)
    "correction": ("A reviewer approved your suggested answer: I use it from now on and in the next training.",
                   "A reviewer did not take your suggested answer this time."),
    "vote": ("A reviewer approved the answer you gave a 👍: I learn from it in the next training.",
             "A reviewer did not take the answer you gave a 👍 for training; your vote still counts as feedback."),
    "shortcut": ("A reviewer approved the answer you added to the training data: I learn from it in the next training.",
                 "A reviewer did not add that answer to the training data this time."),
}


class Review:
    def __init__(self, settings: BotSettings, feedback: Feedback) -> None:
        self.settings, self.feedback = settings, feedback

    # -- something to review arrives -------------------------------------------------------------
    def submitted(self, client: WebClient, row: FeedbackRow, msg: Message) -> None:
        """Ask for a review in the admin channel (public origins only); a 👍 or an "Add to training
        data" on an answer that already waits joins that item without a second post."""
        metrics.REVIEW.labels("pending").inc()
        if not self.settings.admin_channel:
            return
        with session_scope() as s:
            if waits_already(s, row):
                return
        private = self.feedback.visibility.visible_in(client, msg.channel) is not None
        what = WHAT[subject(row)]
        try:
            if private:
                client.chat_postMessage(channel=self.settings.admin_channel, text=(
                    f"A {what} from a private conversation waits for review: `/flywheel review` "
                    f"shows it to admins and reviewers ({self._waiting()} waiting)."))
            else:
                item = self._item_blocks(row, msg)
                client.chat_postMessage(channel=self.settings.admin_channel, blocks=item,
                                        text=f"A {what} by <@{row.user}> waits for review")
        except SlackApiError as exc:  # it stays pending; `/flywheel review` lists it
            log.warning("cannot post the review request", error=exc.response.get("error"))

    def _waiting(self) -> int:
        with session_scope() as s:
            return count_pending(s)

    def _item_blocks(self, row: FeedbackRow, msg: Message) -> list[dict]:
        with session_scope() as s:
            question = previous_user_message(s, msg)
        where = "in a DM" if msg.channel.startswith("D") else f"in <#{msg.channel}>"
        text = normalize(question.text, bot_user_id=self.feedback.prompt.bot_user_id) if question else None
        correction = row.kind == FeedbackKind.correction
        return blocks.review_item_blocks(feedback_id=row.id, author=row.user, where=where,
                                         question=text, answer=msg.text, what=_capital(WHAT[subject(row)]),
                                         suggestion=(row.correction or "") if correction else None)

    # -- `/flywheel review` ----------------------------------------------------------------------
    def pending_reply(self, user: str) -> Reply:
        if not self.settings.is_reviewer(user):
            self._refused(user, "list", "review queue")
            return Reply(NOT_A_REVIEWER)
        with session_scope() as s:
            waiting = count_pending(s)
            items = pending_reviews(s, limit=LISTED)
        if not items:
            return Reply("Nothing waits for review.")
        head = f"*{waiting} item{'s' if waiting != 1 else ''} wait for review*" + (
            f" (the oldest {LISTED} below)" if waiting > LISTED else "")
        out = [{"type": "section", "text": blocks.mrkdwn(head)}]
        for row, msg in items:
            out += [{"type": "divider"}, *self._item_blocks(row, msg)]
        return Reply(head, blocks=out)

    # -- decisions -------------------------------------------------------------------------------
    def decide(self, client: WebClient, user: str, feedback_id: int, *, approve: bool,
               text: str | None = None) -> tuple[bool, str, Callable[[], None]]:
        """(decided, what to tell the channel or the clicker, what to do once Slack has its ack:
        teach the memory and tell the author; slow, so a modal is acked before it)."""
        verb = "approve" if approve else "reject"
        if not self.settings.is_reviewer(user):
            self._refused(user, verb, f"feedback {feedback_id}")
            return False, NOT_A_REVIEWER, _nothing
        try:
            with session_scope() as s:
                row, edited = decide_review(s, feedback_id, actor=user, approve=approve, text=text)
                msg = s.get(Message, row.message_id)
        except StoreError as exc:
            with session_scope() as s:
                record_audit(s, actor=user, action=f"correction.{verb}", target=f"feedback {feedback_id}",
                             outcome="error", detail={"error": str(exc)})
            metrics.REVIEW.labels("error").inc()
            return False, f":x: {exc}", _nothing
        metrics.REVIEW.labels("approved" if approve else "rejected").inc()
        log.info("review decided", feedback_id=feedback_id, item=subject(row), decision=verb, by=user)
        # what the memory learns: a correction's text (an edit: the reviewer's), else only an edit
        taught = edited or (row.correction if row.kind == FeedbackKind.correction else None)
        editor = user if edited else row.user  # the memory cites who wrote the text it holds

        def follow_up() -> None:
            if approve and msg is not None and taught:
                self.feedback.remember(client, msg, editor, taught, source="correction")
            if msg is not None:
                self._tell_author(client, row, msg, approve)

        done = ":white_check_mark: approved" if approve else ":no_entry_sign: rejected"
        whose = f"<@{row.user}>'s {WHAT[subject(row)]}"
        return True, f"{done}{' (edited)' if edited else ''} by <@{user}>: {whose}", follow_up

    def _tell_author(self, client: WebClient, row: FeedbackRow, msg: Message, approve: bool) -> None:
        text = TOLD[subject(row)][0 if approve else 1]
        try:
            client.chat_postEphemeral(channel=msg.channel, user=row.user, text=text)
        except SlackApiError as exc:
            log.info("could not tell the author about the review", error=exc.response.get("error"))

    def _refused(self, user: str, verb: str, target: str) -> None:
        with session_scope() as s:
            record_audit(s, actor=user, action=f"correction.{verb}", target=target, outcome="refused",
                         detail={"reason": "not a reviewer"})
        metrics.REVIEW.labels("refused").inc()

    # -- buttons and the edit modal --------------------------------------------------------------
    def on_button(self, ack, body: dict, client: WebClient, respond) -> None:
        ack()
        action, user = body["actions"][0], body["user"]["id"]
        try:
            feedback_id = int(action.get("value") or "")
        except ValueError:
            respond(text=":x: This review item is not valid.", response_type="ephemeral", replace_original=False)
            return
        if action["action_id"] == blocks.REVIEW_EDIT:
            self._open_editor(body, client, respond, user, feedback_id)
            return
        decided, text, follow_up = self.decide(client, user, feedback_id,
                                               approve=action["action_id"] == blocks.REVIEW_APPROVE)
        if not decided:
            respond(text=text, response_type="ephemeral", replace_original=False)
            return
        follow_up()
        respond(text=text, replace_original=True, blocks=_decided(body.get("message") or {}, feedback_id, text))

    def _open_editor(self, body: dict, client: WebClient, respond, user: str, feedback_id: int) -> None:
        if not self.settings.is_reviewer(user):
            self._refused(user, "edit", f"feedback {feedback_id}")
            respond(text=NOT_A_REVIEWER, response_type="ephemeral", replace_original=False)
            return
        with session_scope() as s:
            found = get_reviewable(s, feedback_id)
        if found is None:
            respond(text=f":x: review item {feedback_id} not found", response_type="ephemeral", replace_original=False)
            return
        row, msg = found
        suggestion = row.correction if row.kind == FeedbackKind.correction else msg.text
        view = blocks.review_edit_modal(feedback_id=feedback_id, suggestion=suggestion or "",
                                        reply_to={"response_url": body.get("response_url")})
        try:
            client.views_open(trigger_id=body["trigger_id"], view=view)
        except SlackApiError as exc:
            log.error("cannot open the review editor", error=exc.response.get("error"))

    def on_edit_submit(self, ack, body: dict, view: dict, client: WebClient) -> None:
        text = blocks.modal_text(view)
        if not text:
            ack(response_action="errors", errors={blocks.CORRECTION_BLOCK: "Please write the answer to teach."})
            return
        meta = blocks.modal_metadata(view)
        try:
            feedback_id = int(meta["feedback_id"])
        except (KeyError, TypeError, ValueError):
            ack(response_action="errors", errors={blocks.CORRECTION_BLOCK: "This review item is not valid."})
            return
        decided, reply, follow_up = self.decide(client, body["user"]["id"], feedback_id, approve=True, text=text)
        if not decided:
            ack(response_action="errors", errors={blocks.CORRECTION_BLOCK: reply.lstrip(":x: ")[:150]})
            return
        ack()  # within Slack's 3 s: the decision is stored; the memory and the author come next
        follow_up()
        if meta.get("response_url"):
            try:
                WebhookClient(meta["response_url"]).send(text=reply, replace_original=True,
                                                         blocks=[{"type": "section", "text": blocks.mrkdwn(reply)}])
            except Exception as exc:  # the decision stands; only the review message stays as it was
                log.info("could not update the review message", error=f"{type(exc).__name__}: {exc}")


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _nothing() -> None:
    return None


def _decided(message: dict, feedback_id: int, result: str | None) -> list[dict]:
    """The review message after a decision: the item's buttons replaced by who decided."""
    kept = [b for b in message.get("blocks") or [] if b.get("block_id") != f"review_{feedback_id}"]
    if result:
        kept.append({"type": "context", "elements": [blocks.mrkdwn(result)]})
    return kept[:50] or [{"type": "section", "text": blocks.mrkdwn(result or " ")}]
