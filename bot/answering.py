"""Answering: decide whether a message is for us, store the question, show progress, ask the
gateway with the thread as context, post the answer with feedback buttons, store the answer."""
from __future__ import annotations

import functools
import threading
import time
from datetime import timedelta

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot import blocks, metrics
from bot.assistant import Assistant
from bot.canary import Canary
from bot.channels import MADE_PRIVATE_SUBTYPE, ChannelVisibility
from bot.gateway_client import Answer, GatewayClient, GatewayError
from bot.periodic import Periodic
from bot.replies import Progress, ReplyOpener, UpdatedReply
from bot.settings import BotSettings
from bot.workers import FairQueue
from flywheel.logs import describe_exception, get_logger
from flywheel.memory import Memory, MemoryPlan, citation
from flywheel.prompt import PromptSettings, build_messages, normalize, question_of
from store.conversations import record_message, thread_messages
from store.db import session_scope
from store.memory import memory_keys
from store.models import Role, utcnow
from store.placeholders import Placeholder, close_placeholder, open_placeholder, placeholders_before
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
TOO_MANY = (":warning: Sorry, I have too many of your questions (or everyone's) waiting at once. "
            "Please try again in a moment, once I have answered those.")
RESTARTING = ":warning: Sorry, I was restarted before I could finish this answer. Please ask again."
CRASHED = (":warning: Sorry, I stopped unexpectedly while writing this answer. Please ask again.")
SWEEP_GRACE_S = 10.0  # past an answer's deadline: a live bot has settled its placeholder by then
EMPTY_QUESTION = "Ask me something after the mention, e.g. _@flywheel what is our refund policy?_"
EMPTY_ANSWER = "_The model returned an empty answer. Try rephrasing the question._"


class Answerer:
    def __init__(self, settings: BotSettings, gateway: GatewayClient, memory: Memory,
                 visibility: ChannelVisibility, queue: FairQueue, *, prompt: PromptSettings,
                 assistant: Assistant, canary: Canary) -> None:
        self.settings, self.gateway, self.memory, self.visibility = settings, gateway, memory, visibility
        self.queue = queue  # the answer workers, each person's questions in a line of their own
        self._open: dict[Placeholder, tuple[UpdatedReply, str | None]] = {}  # placeholders showing
        self._lock = threading.Lock()
        self.prompt = prompt
        self.replies = ReplyOpener(settings.slack_streaming)
        self.assistant, self.canary = assistant, canary

    def _plan(self, messages: list[dict], channel: str, session) -> MemoryPlan:
        """What the team taught that fits this question; a broken memory never blocks an answer."""
        try:
            return self.memory.plan_for(question_of(messages), channel=channel, session=session)
        except Exception as exc:
            metrics.MEMORY.labels("error").inc()
            log.warning("memory unavailable; answering without it", error=describe_exception(exc))
            return MemoryPlan()

    # -- which messages are questions for us ---------------------------------------------------
    def on_app_mention(self, event: dict, body: dict, client: WebClient, bot_user_id: str | None,
                       arrived: float) -> None:
        if not self._first_delivery(body, "app_mention"):
            return
        if _from_a_bot(event, bot_user_id):
            metrics.IGNORED.labels("from_a_bot").inc()
            return
        conversation = event.get("thread_ts") or event["ts"]
        self.answer(client, event, bot_user_id, conversation=conversation, reply_thread=conversation,
                    arrived=arrived)

    def on_message(self, event: dict, body: dict, client: WebClient, bot_user_id: str | None,
                   arrived: float) -> None:
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
                            reply_thread=thread_ts if in_thread else None, arrived=arrived)
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
            self.answer(client, event, bot_user_id, conversation=thread_ts, reply_thread=thread_ts, arrived=arrived)

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
               reply_thread: str | None, arrived: float) -> None:
        """On arrival: store the question, post the placeholder at once and queue the answer in the
        asker's line; the deadline counts from `arrived` (time.monotonic() when the event reached
        the bot). Whatever fails, the person hears back: before the placeholder exists an apology
        is posted instead; after, the placeholder becomes one, at the latest at the deadline."""
        channel, user = event["channel"], event.get("user") or ""
        first = self._store_question(client, event, conversation, reply_thread)
        if first is None:
            return
        if not self.queue.has_room(user):  # beyond this person's share, or every line full
            metrics.ANSWERS.labels("refused").inc()
            log.info("question refused: too many waiting", channel=channel, waiting=self.queue.waiting())
            self._post(client, channel, reply_thread, TOO_MANY)
            return
        prompt = self.prompt.model_copy(update={"bot_user_id": bot_user_id or self.prompt.bot_user_id})
        if not normalize(event.get("text") or "", bot_user_id=prompt.bot_user_id):  # a bare mention
            self._post(client, channel, reply_thread, EMPTY_QUESTION)
            return
        if event.get("channel_type") == "im" and reply_thread:
            self.assistant.thinking(client, channel, reply_thread, event.get("text") or "", first=first,
                                    bot_user_id=prompt.bot_user_id)
        try:
            reply = self.replies.open(client, channel, reply_thread, user=user, team=event.get("team"))
        except SlackApiError as exc:
            metrics.ANSWERS.labels("slack_error").inc()
            log.error("cannot post in the thread; question stored", channel=channel,
                      error=exc.response.get("error"))
            return
        placeholder = Placeholder(channel, reply.ts, conversation)
        self._opened(placeholder, reply, bot_user_id)
        deadline = arrived + self.settings.answer_deadline_s
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), self._too_slow, args=(placeholder, reply))
        watchdog.daemon = True
        watchdog.start()
        job = functools.partial(self._write, placeholder, reply, watchdog, prompt, bot_user_id, deadline,
                                self.canary.model_for(user), question_ts=event["ts"])
        if not self.queue.offer(user, job):  # the line filled up since has_room
            watchdog.cancel()
            if reply.apologize(TOO_MANY):
                metrics.ANSWERS.labels("refused").inc()
            self._settled(placeholder)
        # recorded for the trainer (what may train the shared model); after "Thinking…" shows, since
        # a channel not seen for a while costs a conversations.info call
        self.visibility.visibility(client, channel)

    def _store_question(self, client: WebClient, event: dict, conversation: str,
                        reply_thread: str | None) -> bool | None:
        """Store the question once; None when it was stored before (app_mention and message events
        can both carry one message) or cannot be (an apology is posted), else whether it opens a
        new assistant thread (only a DM thread is Slack's assistant view)."""
        channel, ts = event["channel"], event["ts"]
        try:
            with session_scope() as s:
                if not record_event_once(s, f"msg:{channel}:{ts}", kind="question"):
                    return None
                record_message(s, channel=channel, ts=ts, thread_ts=conversation, role=Role.user,
                               text=event.get("text") or "", author=event.get("user"))
                assistant_thread = event.get("channel_type") == "im" and bool(reply_thread)
                return assistant_thread and len(thread_messages(s, channel, conversation, limit=2)) == 1
        except Exception as exc:
            metrics.ANSWERS.labels("store_error").inc()
            log.error("cannot store the question; apology posted", channel=channel,
                      error=describe_exception(exc))
            self._post(client, channel, reply_thread, SORRY)
            return None

    def _write(self, placeholder: Placeholder, reply: UpdatedReply, watchdog: threading.Timer,
               prompt: PromptSettings, bot_user_id: str | None, deadline: float, model: str | None, *,
               question_ts: str) -> None:
        """On an answer worker: write the answer into the placeholder, unless the deadline's
        apology already shows there (it passed while the question waited)."""
        try:
            if not reply.final:
                self._fill(reply, prompt, placeholder, bot_user_id, deadline, model=model, question_ts=question_ts)
        except Exception as exc:  # the database, a bug, anything: never leave "Thinking…" behind
            metrics.ANSWERS.labels("error").inc()
            log.error("answer failed; apology shown", channel=reply.channel, ts=reply.ts,
                      error=describe_exception(exc))
            if reply.apologize(SORRY):
                record_apology(placeholder, bot_user_id, SORRY, f"{type(exc).__name__}: {exc}")
        finally:
            watchdog.cancel()
            self._settled(placeholder)

    # -- placeholders showing: recorded, so neither a shutdown nor a crash leaves one behind ---------
    def _opened(self, placeholder: Placeholder, reply: UpdatedReply, bot_user_id: str | None) -> None:
        with self._lock:
            self._open[placeholder] = (reply, bot_user_id)
        try:
            with session_scope() as s:
                open_placeholder(s, placeholder)
        except Exception as exc:  # the answer goes on; only a crash before it ends would leave it showing
            log.warning("cannot record the placeholder", channel=placeholder.channel, error=describe_exception(exc))

    def _settled(self, placeholder: Placeholder) -> None:
        with self._lock:
            self._open.pop(placeholder, None)
        try:
            with session_scope() as s:
                close_placeholder(s, placeholder)
        except Exception as exc:  # the sweep may apologise for it later: an apology over a final message
            log.warning("cannot close the placeholder", channel=placeholder.channel, error=describe_exception(exc))

    def drain(self, timeout_s: float) -> int:
        """Shutdown (SIGTERM): take no more questions, let the waiting and running answers finish
        for up to `timeout_s`, then turn every placeholder still showing into an apology; how many."""
        self.queue.close()
        if self.queue.wait_idle(timeout_s):
            return 0
        with self._lock:
            left = list(self._open.items())
        for placeholder, (reply, bot_user_id) in left:
            if reply.apologize(RESTARTING):
                metrics.ANSWERS.labels("shutdown").inc()
                record_apology(placeholder, bot_user_id, RESTARTING, "shut down before the answer")
            self._settled(placeholder)
        log.warning("answers unfinished at shutdown; apologies shown", count=len(left), drain_s=timeout_s)
        return len(left)

    def _fill(self, reply: UpdatedReply, prompt: PromptSettings, placeholder: Placeholder,
              bot_user_id: str | None, deadline: float, *, model: str | None, question_ts: str) -> None:
        """Ask for the answer (memory or model), store it, and show it in the placeholder. The
        context ends at the question (`question_ts`): questions asked in the thread while this
        one waited are answered in their own turn."""
        channel, answer_ts, conversation = reply.channel, reply.ts, placeholder.conversation
        with session_scope() as s:
            history = thread_messages(s, channel, conversation, limit=prompt.context_max_messages * 2,
                                      until_ts=question_ts)
            messages = build_messages(history, prompt)
            plan = self._plan(messages, channel, s)
            cited = memory_keys(s, [item.id for item in plan.used])  # what citation(plan) names
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
            record_apology(placeholder, bot_user_id, apology, str(exc))
            reply.apologize(apology)
            return
        metrics.ANSWER_SECONDS.observe(answer.latency_ms / 1000)
        if reply.final:  # the deadline's apology is showing: a late answer is not stored as shown
            return
        error = None if answer.text else "empty answer"
        with session_scope() as s:  # stored before Slack shows it, so votes always find it
            record_message(s, channel=channel, ts=answer_ts, thread_ts=conversation, role=Role.assistant,
                           text=answer.text or EMPTY_ANSWER, author=bot_user_id,
                           model_version=answer.model_version, latency_ms=answer.latency_ms, error=error,
                           cited=cited)
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

    def _too_slow(self, placeholder: Placeholder, reply: UpdatedReply) -> None:
        """The deadline (counted from the question's arrival): whatever the answer still waits
        for, a worker or the gateway, the person hears back now."""
        if reply.apologize(TOO_SLOW):
            metrics.ANSWERS.labels("deadline").inc()
            log.warning("answer deadline passed; apology shown", channel=reply.channel, ts=reply.ts,
                        deadline_s=self.settings.answer_deadline_s)
        self._settled(placeholder)

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


def record_apology(placeholder: Placeholder, bot_user_id: str | None, text: str, error: str) -> None:
    """Keep an apology in the thread's history when the store lets us (it may be the fault)."""
    try:
        with session_scope() as s:
            record_message(s, channel=placeholder.channel, ts=placeholder.ts, thread_ts=placeholder.conversation,
                           role=Role.assistant, text=text, author=bot_user_id, error=error[:2000])
    except Exception as exc:
        log.warning("cannot store the apology", channel=placeholder.channel, error=describe_exception(exc))


class PlaceholderSweeper:
    """Placeholders a crashed bot left showing (SIGKILL, a lost node: no drain ran) become an
    apology, at start-up and then every answer deadline. Only those posted longer ago than the
    deadline and a grace are touched: a live bot (this one or another replica) settles its own by
    then, so the sweep never speaks over an answer still being written."""

    def __init__(self, settings: BotSettings, client: WebClient) -> None:
        self.settings, self.client = settings, client
        self.rounds = Periodic("placeholder-sweep", settings.answer_deadline_s, self.sweep_once)

    def start(self) -> None:
        self.rounds.start()

    def stop(self) -> None:
        self.rounds.stop()

    def sweep_once(self) -> int:
        """Apologise in every orphaned placeholder; how many."""
        before = utcnow() - timedelta(seconds=self.settings.answer_deadline_s + SWEEP_GRACE_S)
        with session_scope() as s:
            left = placeholders_before(s, before)
        for placeholder in left:
            try:
                self.client.chat_update(channel=placeholder.channel, ts=placeholder.ts, text=CRASHED,
                                        blocks=[{"type": "section", "text": blocks.mrkdwn(CRASHED)}])
                metrics.ANSWERS.labels("crashed").inc()
            except SlackApiError as exc:  # deleted meanwhile, say: nothing left to fix
                log.warning("cannot apologise in a placeholder left by a crash", channel=placeholder.channel,
                            error=exc.response.get("error"))
            record_apology(placeholder, None, CRASHED, "the bot stopped before the answer")
            with session_scope() as s:
                close_placeholder(s, placeholder)
        if left:
            log.warning("placeholders left by a crash turned into apologies", count=len(left))
        return len(left)
