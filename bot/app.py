"""The Bolt app: which Slack event, action, view, shortcut and command goes to which handler."""
from __future__ import annotations

import logging
import re
import threading

from slack_bolt import App
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
)
from slack_sdk.web import WebClient

from bot import blocks, docreview, metrics
from bot.admin import Admin
from bot.answering import Answerer
from bot.assistant import Assistant
from bot.canary import Canary
from bot.channels import CHANGE_EVENTS, ChannelVisibility
from bot.feedback import Feedback
from bot.forgetting import SUBTYPES as FORGETTING_SUBTYPES
from bot.forgetting import Forgetting
from bot.gateway_client import GatewayClient
from bot.home import publish_home
from bot.replays import once_only
from bot.reports import on_report_button, on_watch_button
from bot.review import Review
from bot.settings import BotSettings
from bot.workers import FairQueue, LaneExecutor, lane_middleware
from flywheel.logs import describe_exception, get_logger
from flywheel.memory import Memory, MemorySettings
from flywheel.prompt import PromptSettings

log = get_logger("bot.app")
COMMAND = "/flywheel"


def make_web_client(settings: BotSettings) -> WebClient:
    """Slack's Web API (or the local double): 429s wait for Retry-After, dropped connections retry."""
    return WebClient(
        token=settings.slack_bot_token, base_url=settings.api_base_url, timeout=30,
        retry_handlers=[ConnectionErrorRetryHandler(max_retry_count=settings.slack_retries),
                        RateLimitErrorRetryHandler(max_retry_count=settings.slack_retries)])


def create_app(settings: BotSettings, *, gateway: GatewayClient, socket_mode: bool = False) -> App:
    """Build the Bolt app: the shared objects once, then the listeners by subject. Over HTTP every
    request must carry a valid Slack signature at most five minutes old (Bolt's verification);
    Socket Mode needs no signing secret."""
    if not settings.slack_bot_token:
        raise ValueError("missing setting SLACK_BOT_TOKEN (the bot's xoxb- token)")
    if not socket_mode:
        settings.require_http_credentials()
    executor = LaneExecutor(settings.event_threads, settings.command_threads)
    answers = FairQueue(settings.listener_threads, user_running=settings.answer_user_running,
                        user_waiting=settings.answer_user_queue, capacity=settings.answer_queue)
    app = _bolt_app(settings, executor, socket_mode)
    memory = Memory(MemorySettings())  # the memory settings, read once for the bot
    threading.Thread(target=memory.warm, name="memory-warm-up", daemon=True).start()
    visibility = ChannelVisibility(settings.channel_visibility_ttl_s)  # one channel-visibility cache
    prompt = PromptSettings()  # one reading of the prompt settings, for answers and for what is taught
    feedback = Feedback(settings, memory, visibility, prompt)
    assistant = Assistant(settings, visibility)
    canary = Canary(settings)  # one view of the canary alias: a command's move shows at the next answer
    answerer = Answerer(settings, gateway, memory, visibility, answers, prompt=prompt, assistant=assistant,
                        canary=canary)
    review = feedback.review = Review(settings, feedback)
    admin = Admin(settings, gateway, review=review, canary=canary)
    forgetting = Forgetting(settings, feedback, review)
    app.flywheel = {"settings": settings, "gateway": gateway, "admin": admin,  # for the server
                    "executor": executor, "answers": answers, "answerer": answerer}
    # Bolt runs only the first listener that matches a request: registration order is precedence.
    register_question_listeners(app, answerer, assistant, forgetting)
    register_visibility_listeners(app, visibility)
    register_feedback_listeners(app, feedback)
    register_admin_listeners(app, admin)
    register_review_listeners(app, review, docreview.DocReview(settings, memory))
    register_home_listeners(app, settings, visibility, assistant)
    app.error(_log_listener_error)
    return app


def _bolt_app(settings: BotSettings, executor: LaneExecutor, socket_mode: bool) -> App:
    """The Bolt app with its client, signature check, listener lanes and middleware."""
    app = App(
        client=make_web_client(settings),
        signing_secret=settings.slack_signing_secret or "", request_verification_enabled=not socket_mode,
        process_before_response=False, logger=logging.getLogger("slack_bolt"),
        listener_executor=executor,
    )
    app.use(lane_middleware)  # commands and clicks never wait behind answers
    app.use(once_only)  # a replayed command or click (signed, inside Slack's window) runs once
    return app


def register_question_listeners(app: App, answerer: Answerer, assistant: Assistant,
                                forgetting: Forgetting) -> None:
    """Mentions, messages and the assistant view's threads; a deleted or edited message is forgotten."""
    @app.event("app_mention")
    def _mention(event, body, client, context):
        answerer.on_app_mention(event, body, client, context.bot_user_id, context["arrived"])

    @app.event("message")
    def _message(event, body, client, context):
        if event.get("subtype") in FORGETTING_SUBTYPES:  # deleted or edited: what it taught changes
            forgetting.on_message(event, client, context.bot_user_id)
            return
        answerer.on_message(event, body, client, context.bot_user_id, context["arrived"])

    @app.event("assistant_thread_started")
    def _assistant_thread(event, client, context):
        assistant.on_thread_started(event, client, context.bot_user_id)


def register_visibility_listeners(app: App, visibility: ChannelVisibility) -> None:
    """Who may see a channel: its changes reset the cache; the assistant's open channel is ignored."""
    @app.event(re.compile("^(" + "|".join(CHANGE_EVENTS) + ")$"))
    def _channel_changed(event, client):
        visibility.changed(client, event.get("channel"))

    @app.event("assistant_thread_context_changed")
    def _assistant_context(event):
        metrics.IGNORED.labels("assistant_context").inc()  # answers do not depend on the open channel


def register_feedback_listeners(app: App, feedback: Feedback) -> None:
    """Reactions, vote and suggest buttons, the correction form and the message shortcuts."""
    @app.event("reaction_added")
    def _reaction_added(event, body, client, context):
        feedback.on_reaction(event, body, client, context.bot_user_id, removed=False)

    @app.event("reaction_removed")
    def _reaction_removed(event, body, client, context):
        feedback.on_reaction(event, body, client, context.bot_user_id, removed=True)

    app.action(blocks.FEEDBACK_ACTION)(feedback.on_vote_button)
    app.action(re.compile("^(" + "|".join(blocks.VOTE_ACTIONS) + ")$"))(feedback.on_vote_button)
    app.action(blocks.SUGGEST_ACTION)(feedback.on_suggest)
    app.view_submission(blocks.CORRECTION_VIEW)(feedback.on_correction)
    app.message_shortcut(blocks.SHORTCUT_INCLUDE)(feedback.on_include_shortcut)
    app.message_shortcut(blocks.SHORTCUT_GOLDEN)(feedback.on_golden_shortcut)


def register_admin_listeners(app: App, admin: Admin) -> None:
    """The slash command (acked at once, run lazily) and the report and watch buttons."""
    def _ack_command(ack):
        ack()  # within Slack's 3 s, whatever the store or the gateway are doing

    def _run_command(command, respond):
        try:
            reply = admin.run_command(command["user_id"], command.get("text", ""))
        except Exception as exc:  # the caller must hear something, not silence
            log.error("command failed", command=(command.get("text") or "").split(" ", 1)[0][:32],
                      error=describe_exception(exc))
            respond(text=f":x: The command failed on our side ({type(exc).__name__}); it was logged. "
                         "Try again in a moment.", response_type="ephemeral")
            return
        respond(text=reply.text, blocks=reply.blocks,
                response_type="in_channel" if reply.public else "ephemeral")

    app.command(COMMAND)(ack=_ack_command, lazy=[_run_command])

    @app.action(re.compile(f"^({blocks.REPORT_APPROVE}|{blocks.REPORT_REJECT})$"))
    def _report_button(ack, body, client, respond):
        on_report_button(admin, ack, body, client, respond)

    @app.action(re.compile(f"^({blocks.WATCH_ROLLBACK}|{blocks.WATCH_STOP_CANARY})$"))
    def _watch_button(ack, body, client, respond):
        on_watch_button(admin, ack, body, client, respond)


def register_review_listeners(app: App, review: Review, documents: docreview.DocReview) -> None:
    """The correction review's buttons and its edit form; those of documents' questions."""
    app.action(re.compile(f"^({blocks.REVIEW_APPROVE}|{blocks.REVIEW_EDIT}|{blocks.REVIEW_REJECT})$"))(
        review.on_button)
    app.view_submission(blocks.REVIEW_EDIT_VIEW)(review.on_edit_submit)
    app.action(re.compile("^(" + "|".join(docreview.ACTIONS) + ")$"))(documents.on_button)
    app.view_submission(docreview.EDIT_VIEW)(documents.on_edit_submit)


def register_home_listeners(app: App, settings: BotSettings, visibility: ChannelVisibility,
                            assistant: Assistant) -> None:
    """App Home: the home tab is published; the messages tab opens the agent view's conversation."""
    @app.event("app_home_opened")
    def _home(event, client, context):
        if event.get("tab", "home") == "home":
            publish_home(settings, client, event["user"], visibility)
        elif event.get("tab") == "messages":  # the agent view's conversation opened
            assistant.on_messages_opened(event, client, context.bot_user_id)


def _log_listener_error(error, body):
    log.error("listener failed", error=describe_exception(error), type=(body or {}).get("type"))
