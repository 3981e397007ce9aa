"""Answering: decide whether a message is for us, store the question, show progress, ask the
gateway with the thread as context, post the answer with feedback buttons, store the answer."""
from __future__ import annotations

import time

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot import blocks, metrics
from bot.gateway_client import Answer, GatewayClient, GatewayError
from bot.settings import BotSettings
from flywheel.logs import get_logger
from flywheel.memory import Memory, MemoryPlan, citation
from flywheel.prompt import PromptSettings, build_messages, normalize, question_of
from store.conversations import record_message, thread_messages
from store.db import session_scope
from store.models import Role
from store.receipts import record_event_once

log = get_logger("bot.answering")

DM_CONVERSATION = "dm"  # a DM's top level is one long conversation
ANSWERABLE_SUBTYPES = (None, "file_share", "thread_broadcast")
FRIENDLY_DOWN = (":warning: Sorry, I can't reach the model right now. Your question is saved; "
                 "please ask again in a minute.")
EMPTY_QUESTION = "Ask me something after the mention, e.g. _@flywheel what is our refund policy?_"
EMPTY_ANSWER = "_The model returned an empty answer. Try rephrasing the question._"


class _Progress:
    """Shows the answer growing in the placeholder message, at most one update per interval."""

    def __init__(self, client: WebClient, channel: str, ts: str, interval_s: float) -> None:
        self.client, self.channel, self.ts, self.interval = client, channel, ts, interval_s
        self.last = time.monotonic()

    def __call__(self, text_so_far: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        try:
            self.client.chat_update(channel=self.channel, ts=self.ts, text=text_so_far,
                                    blocks=blocks.streaming_blocks(text_so_far))
        except SlackApiError as exc:  # progress is best effort; the final update matters
            log.warning("progress update failed", error=exc.response.get("error"))


class Answerer:
    def __init__(self, settings: BotSettings, gateway: GatewayClient, memory: Memory,
                 prompt: PromptSettings | None = None) -> None:
        self.settings, self.gateway, self.memory = settings, gateway, memory
        self.prompt = prompt or PromptSettings()

    def _plan(self, messages: list[dict], channel: str, session) -> MemoryPlan:
        """What the team taught that fits this question; a broken memory never blocks an answer."""
        try:
            return self.memory.plan_for(question_of(messages), channel=channel, session=session)
        except Exception as exc:
            metrics.MEMORY.labels("error").inc()
            log.warning("memory unavailable; answering without it", error=f"{type(exc).__name__}: {exc}")
            return MemoryPlan()

    # -- which messages are questions for us ---------------------------------------------------
    def on_app_mention(self, event: dict, body: dict, client: WebClient, bot_user_id: str | None) -> None:
        if not self._first_delivery(body, "app_mention"):
            return
        if _from_a_bot(event, bot_user_id):
            metrics.IGNORED.labels("from_a_bot").inc()
            return
        conversation = event.get("thread_ts") or event["ts"]
        self.answer(client, event, bot_user_id, conversation=conversation, reply_thread=conversation)

    def on_message(self, event: dict, body: dict, client: WebClient, bot_user_id: str | None) -> None:
        if _from_a_bot(event, bot_user_id) or event.get("subtype") not in ANSWERABLE_SUBTYPES:
            metrics.IGNORED.labels("from_a_bot" if _from_a_bot(event, bot_user_id) else "subtype").inc()
            return
        thread_ts = event.get("thread_ts")
        in_thread = bool(thread_ts) and thread_ts != event["ts"]
        if event.get("channel_type") == "im":
            if self._first_delivery(body, "message"):
                conversation = thread_ts if in_thread else DM_CONVERSATION
                self.answer(client, event, bot_user_id, conversation=conversation,
                            reply_thread=thread_ts if in_thread else None)
            return
        if bot_user_id and f"<@{bot_user_id}" in (event.get("text") or ""):
            metrics.IGNORED.labels("mention").inc()  # the app_mention event for this message answers it
            return
        if not in_thread:
            metrics.IGNORED.labels("not_in_a_thread").inc()
            return
        with session_scope() as s:
            ours = bool(thread_messages(s, event["channel"], thread_ts, limit=1))
        if not ours:
            metrics.IGNORED.labels("not_our_thread").inc()
            return
        if self._first_delivery(body, "message"):  # a follow-up in a thread of ours
            self.answer(client, event, bot_user_id, conversation=thread_ts, reply_thread=thread_ts)

    def _first_delivery(self, body: dict, kind: str) -> bool:
        metrics.EVENTS.labels(kind).inc()
        event_id = body.get("event_id")
        if not event_id:
            return True
        with session_scope() as s:
            first = record_event_once(s, event_id, kind=kind)
        if not first:
            metrics.DUPLICATES.inc()
            log.info("duplicate delivery dropped", event_id=event_id)
        return first

    # -- the answer ----------------------------------------------------------------------------
    def answer(self, client: WebClient, event: dict, bot_user_id: str | None, *, conversation: str,
               reply_thread: str | None) -> None:
        channel, ts, user = event["channel"], event["ts"], event.get("user")
        text = event.get("text") or ""
        with session_scope() as s:
            # app_mention and message events can both carry one message: answer it once
            if not record_event_once(s, f"msg:{channel}:{ts}", kind="question"):
                return
            record_message(s, channel=channel, ts=ts, thread_ts=conversation, role=Role.user,
                           text=text, author=user)
        prompt = self.prompt.model_copy(update={"bot_user_id": bot_user_id or self.prompt.bot_user_id})
        if not normalize(text, bot_user_id=prompt.bot_user_id):  # a bare mention: nothing to ask the model
            try:
                client.chat_postMessage(channel=channel, thread_ts=reply_thread, text=EMPTY_QUESTION)
            except SlackApiError as exc:
                log.warning("cannot post the hint", channel=channel, error=exc.response.get("error"))
            return
        try:
            placeholder = client.chat_postMessage(channel=channel, thread_ts=reply_thread,
                                                  text=blocks.THINKING)
        except SlackApiError as exc:
            metrics.ANSWERS.labels("slack_error").inc()
            log.error("cannot post in the thread; question stored", channel=channel,
                      error=exc.response.get("error"))
            return
        answer_ts = placeholder["ts"]
        with session_scope() as s:
            history = thread_messages(s, channel, conversation, limit=prompt.context_max_messages * 2)
            messages = build_messages(history, prompt)
            plan = self._plan(messages, channel, s)
        metrics.MEMORY.labels("answer" if plan.direct else "notes" if plan.notes else "none").inc()
        progress = _Progress(client, channel, answer_ts, self.settings.stream_update_interval_s)
        try:
            if plan.direct:  # the team already answered this question: say so, no model needed
                answer = Answer(text=plan.direct.answer, model_version="memory", latency_ms=0.0)
            else:
                answer = self.gateway.chat(plan.apply(messages), on_delta=progress)
        except GatewayError as exc:
            metrics.ANSWERS.labels("gateway_error").inc()
            log.warning("gateway failed; friendly message posted", channel=channel, error=str(exc))
            with session_scope() as s:
                record_message(s, channel=channel, ts=answer_ts, thread_ts=conversation, role=Role.assistant,
                               text=FRIENDLY_DOWN, author=bot_user_id, error=str(exc))
            self._update(client, channel, answer_ts, FRIENDLY_DOWN,
                         [{"type": "section", "text": blocks.mrkdwn(FRIENDLY_DOWN)}])
            return
        metrics.ANSWER_SECONDS.observe(answer.latency_ms / 1000)
        error = None if answer.text else "empty answer"
        with session_scope() as s:  # stored before Slack shows it, so votes always find it
            record_message(s, channel=channel, ts=answer_ts, thread_ts=conversation, role=Role.assistant,
                           text=answer.text or EMPTY_ANSWER, author=bot_user_id,
                           model_version=answer.model_version, latency_ms=answer.latency_ms, error=error)
        if error:
            shown = [{"type": "section", "text": blocks.mrkdwn(EMPTY_ANSWER)}]
            self._update(client, channel, answer_ts, EMPTY_ANSWER, shown)
            metrics.ANSWERS.labels("empty").inc()
            return
        shown = blocks.answer_blocks(answer.text, model_version=answer.model_version,
                                     latency_ms=answer.latency_ms, style=self.settings.feedback_style,
                                     source=citation(plan))
        if self._update(client, channel, answer_ts, answer.text, shown):
            metrics.ANSWERS.labels("ok").inc()
            log.info("answered", channel=channel, ts=answer_ts, version=answer.model_version,
                     latency_ms=answer.latency_ms)

    @staticmethod
    def _update(client: WebClient, channel: str, ts: str, text: str, shown: list[dict]) -> bool:
        try:
            client.chat_update(channel=channel, ts=ts, text=text[:3000], blocks=shown)
            return True
        except SlackApiError as exc:
            metrics.ANSWERS.labels("slack_error").inc()
            log.error("cannot show the answer", channel=channel, ts=ts, error=exc.response.get("error"))
            return False


def _from_a_bot(event: dict, bot_user_id: str | None) -> bool:
    """Bots (ourselves included) never get answers: that way lie loops."""
    return bool(event.get("bot_id") or event.get("subtype") == "bot_message"
                or (bot_user_id and event.get("user") == bot_user_id) or not event.get("user"))
