"""Answering: decide whether a message is for us, store the question, show progress, ask the
gateway with the thread as context, post the answer with feedback buttons, store the answer."""
from __future__ import annotations

import threading
import time

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot import blocks, metrics
from bot.assistant import Assistant
from bot.canary import Canary
from bot.channels import MADE_PRIVATE_SUBTYPE, ChannelVisibility
from bot.gateway_client import Answer, GatewayClient, GatewayError
from bot.replies import Progress, ReplyOpener, UpdatedReply
from bot.settings import BotSettings
from flywheel.logs import describe_exception, get_logger
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
SORRY = (":warning: Sorry, something went wrong on my side and I could not answer. "
         "Please ask again in a minute.")
TOO_SLOW = (":warning: Sorry, the model took too long to answer. Please ask again in a minute, "
            "perhaps in fewer words.")
EMPTY_QUESTION = "Ask me something after the mention, e.g. _@flywheel what is our refund policy?_"
EMPTY_ANSWER = "_The model returned an empty answer. Try rephrasing the question._"


class Answerer:
    def __init__(self, settings: BotSettings, gateway: GatewayClient, memory: Memory,
                 visibility: ChannelVisibility, prompt: PromptSettings | None = None,
                 assistant: Assistant | None = None, canary: Canary | None = None) -> None:
        self.settings, self.gateway, self.memory, self.visibility = settings, gateway, memory, visibility
        self.prompt = prompt or PromptSettings()
        self.replies = ReplyOpener(settings.slack_streaming)
        self.assistant = assistant or Assistant(settings)
        self.canary = canary or Canary(settings)

    def _plan(self, messages: list[dict], channel: str, session) -> MemoryPlan:
        """What the team taught that fits this question; a broken memory never blocks an answer."""
        try:
            return self.memory.plan_for(question_of(messages), channel=channel, session=session)
        except Exception as exc:
            metrics.MEMORY.labels("error").inc()
            log.warning("memory unavailable; answering without it", error=describe_exception(exc))
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
        if event.get("subtype") == MADE_PRIVATE_SUBTYPE:  # who may see the channel changed
            self.visibility.changed(client, event.get("channel"))
            return
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
        try:
            with session_scope() as s:
                ours = bool(thread_messages(s, event["channel"], thread_ts, limit=1))
        except Exception as exc:  # the store is down: whose thread this is cannot be told
            log.warning("cannot tell whether a thread is ours", channel=event["channel"],
                        error=describe_exception(exc))
            return
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
        try:
            with session_scope() as s:
                first = record_event_once(s, event_id, kind=kind)
        except Exception as exc:  # the store is down: a rare double answer beats silence
            log.warning("cannot record the delivery; answering anyway", event_id=event_id,
                        error=describe_exception(exc))
            return True
        if not first:
            metrics.DUPLICATES.inc()
            log.info("duplicate delivery dropped", event_id=event_id)
        return first

    # -- the answer ----------------------------------------------------------------------------
    def answer(self, client: WebClient, event: dict, bot_user_id: str | None, *, conversation: str,
               reply_thread: str | None) -> None:
        """Whatever fails, the person hears back: before the placeholder exists an apology is
        posted instead; after, the placeholder becomes one, at the latest at the deadline."""
        deadline = time.monotonic() + self.settings.answer_deadline_s
        channel, ts, user = event["channel"], event["ts"], event.get("user")
        text = event.get("text") or ""
        try:
            with session_scope() as s:
                # app_mention and message events can both carry one message: answer it once
                if not record_event_once(s, f"msg:{channel}:{ts}", kind="question"):
                    return
                record_message(s, channel=channel, ts=ts, thread_ts=conversation, role=Role.user,
                               text=text, author=user)
                # a DM thread is Slack's assistant view: only there does it matter whether it is new
                assistant_thread = event.get("channel_type") == "im" and bool(reply_thread)
                first = assistant_thread and len(thread_messages(s, channel, conversation, limit=2)) == 1
        except Exception as exc:
            metrics.ANSWERS.labels("store_error").inc()
            log.error("cannot store the question; apology posted", channel=channel,
                      error=describe_exception(exc))
            self._post(client, channel, reply_thread, SORRY)
            return
        self.visibility.visibility(client, channel)  # recorded for the trainer: what may train the shared model
        prompt = self.prompt.model_copy(update={"bot_user_id": bot_user_id or self.prompt.bot_user_id})
        if not normalize(text, bot_user_id=prompt.bot_user_id):  # a bare mention: nothing to ask the model
            self._post(client, channel, reply_thread, EMPTY_QUESTION)
            return
        if assistant_thread:
            self.assistant.thinking(client, channel, reply_thread, text, first=first,
                                    bot_user_id=prompt.bot_user_id)
        try:
            reply = self.replies.open(client, channel, reply_thread, user=user, team=event.get("team"))
        except SlackApiError as exc:
            metrics.ANSWERS.labels("slack_error").inc()
            log.error("cannot post in the thread; question stored", channel=channel,
                      error=exc.response.get("error"))
            return
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), self._too_slow, args=(reply,))
        watchdog.daemon = True
        watchdog.start()
        try:
            self._fill(reply, prompt, conversation, bot_user_id, deadline, model=self.canary.model_for(user))
        except Exception as exc:  # the database, a bug, anything: never leave "Thinking…" behind
            metrics.ANSWERS.labels("error").inc()
            log.error("answer failed; apology shown", channel=channel, ts=reply.ts,
                      error=describe_exception(exc))
            if reply.apologize(SORRY):
                self._record_apology(reply, conversation, bot_user_id, SORRY, f"{type(exc).__name__}: {exc}")
        finally:
            watchdog.cancel()

    def _fill(self, reply: UpdatedReply, prompt: PromptSettings, conversation: str, bot_user_id: str | None,
              deadline: float, model: str | None = None) -> None:
        """Ask for the answer (memory or model), store it, and show it in the placeholder."""
        channel, answer_ts = reply.channel, reply.ts
        with session_scope() as s:
            history = thread_messages(s, channel, conversation, limit=prompt.context_max_messages * 2)
            messages = build_messages(history, prompt)
            plan = self._plan(messages, channel, s)
        metrics.MEMORY.labels("answer" if plan.direct else "notes" if plan.notes else "none").inc()
        progress = Progress(reply, self.settings.stream_update_interval_s)
        try:
            if plan.direct:  # the team already answered this question: say so, no model needed
                answer = Answer(text=plan.direct.answer, model_version="memory", latency_ms=0.0)
            else:
                answer = self._ask(plan.apply(messages), progress, deadline, model)
        except GatewayError as exc:
            slow = exc.kind in ("deadline", "timeout")
            metrics.ANSWERS.labels("deadline" if slow else "gateway_error").inc()
            log.warning("gateway failed; apology shown", channel=channel, reason=exc.kind)
            apology = TOO_SLOW if slow else FRIENDLY_DOWN
            self._record_apology(reply, conversation, bot_user_id, apology, str(exc))
            reply.apologize(apology)
            return
        metrics.ANSWER_SECONDS.observe(answer.latency_ms / 1000)
        if reply.final:  # the deadline's apology is showing: a late answer is not stored as shown
            return
        error = None if answer.text else "empty answer"
        with session_scope() as s:  # stored before Slack shows it, so votes always find it
            record_message(s, channel=channel, ts=answer_ts, thread_ts=conversation, role=Role.assistant,
                           text=answer.text or EMPTY_ANSWER, author=bot_user_id,
                           model_version=answer.model_version, latency_ms=answer.latency_ms, error=error)
        if error:
            if reply.apologize(EMPTY_ANSWER):
                metrics.ANSWERS.labels("empty").inc()
            return
        shown = blocks.answer_blocks(answer.text, model_version=answer.model_version,
                                     latency_ms=answer.latency_ms, style=self.settings.feedback_style,
                                     source=citation(plan))
        if reply.finish(answer.text, shown):
            metrics.ANSWERS.labels("ok").inc()
            log.info("answered", channel=channel, ts=answer_ts, version=answer.model_version,
                     latency_ms=answer.latency_ms)

    def _ask(self, messages: list[dict], progress, deadline: float, model: str | None) -> Answer:
        """The gateway's answer; a canary version the gateway refuses (not loadable, rejected since)
        is not the asker's problem: production answers instead."""
        try:
            return self.gateway.chat(messages, on_delta=progress, deadline=deadline, model=model)
        except GatewayError as exc:
            if model is None or not exc.kind.startswith("status 4"):
                raise
            log.warning("canary version refused by the gateway; production answers", version=model,
                        reason=exc.kind)
            return self.gateway.chat(messages, on_delta=progress, deadline=deadline)

    def _too_slow(self, reply: UpdatedReply) -> None:
        """The deadline: whatever the worker is still waiting for, the person hears back now."""
        if reply.apologize(TOO_SLOW):
            metrics.ANSWERS.labels("deadline").inc()
            log.warning("answer deadline passed; apology shown", channel=reply.channel, ts=reply.ts,
                        deadline_s=self.settings.answer_deadline_s)

    @staticmethod
    def _record_apology(reply: UpdatedReply, conversation: str, bot_user_id: str | None, text: str,
                        error: str) -> None:
        """Keep the apology in the thread's history when the store lets us (it may be the fault)."""
        try:
            with session_scope() as s:
                record_message(s, channel=reply.channel, ts=reply.ts, thread_ts=conversation,
                               role=Role.assistant, text=text, author=bot_user_id, error=error[:2000])
        except Exception as exc:
            log.warning("cannot store the apology", channel=reply.channel, error=describe_exception(exc))

    @staticmethod
    def _post(client: WebClient, channel: str, thread_ts: str | None, text: str) -> None:
        try:
            client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=text)
        except SlackApiError as exc:
            log.warning("cannot post in the thread", channel=channel, error=exc.response.get("error"))


def _from_a_bot(event: dict, bot_user_id: str | None) -> bool:
    """Bots (ourselves included) never get answers: that way lie loops."""
    return bool(event.get("bot_id") or event.get("subtype") == "bot_message"
                or (bot_user_id and event.get("user") == bot_user_id) or not event.get("user"))
