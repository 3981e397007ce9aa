"""App Home: what the bot serves, how training goes, and where it answers worst."""
from __future__ import annotations

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot.admin import feedback_summary, run_line
from bot.blocks import mrkdwn, plain
from bot.settings import BotSettings
from bot.slack_text import escape
from flywheel.prompt import normalize
from flywheel.logs import get_logger
from store.conversations import previous_user_message
from store.db import session_scope
from store.feedback import top_downvoted_answers
from store.overview import overview

log = get_logger("bot.home")


def _short(text: str, n: int = 150) -> str:
    text = " ".join(text.split())
    return escape(text if len(text) <= n else text[:n] + "…")


def home_view(settings: BotSettings, user: str) -> dict:
    with session_scope() as s:
        o = overview(s, runs=5)
        worst = [(m, n, previous_user_message(s, m)) for m, n in top_downvoted_answers(s, limit=5)]
    prod, runs, questions, answers = o.production, o.runs, o.questions, o.answers
    feedback, examples = o.feedback, o.examples
    blocks = [
        {"type": "header", "text": plain("Flywheel")},
        {"type": "section", "text": mrkdwn(f"*Production model:* `{prod or 'base model'}`")},
        {"type": "section", "text": mrkdwn("*Last training runs*\n" + (
            "\n".join(f"• {run_line(r)}" for r in runs) if runs else "_none yet_"))},
        {"type": "section", "fields": [
            mrkdwn(f"*Questions*\n{questions}"), mrkdwn(f"*Answers*\n{answers}"),
            mrkdwn(f"*Examples*\n{examples.get('total', 0)} ({examples.get('golden', 0)} golden)"),
            mrkdwn(f"*Feedback*\n{feedback_summary(feedback)}"),
        ]},
        {"type": "divider"},
        {"type": "section", "text": mrkdwn("*Most 👎 answers*")},
    ]
    if not worst:
        blocks.append({"type": "context", "elements": [mrkdwn("No 👎 yet.")]})
    for msg, downs, question in worst:
        q = _short(normalize(question.text)) if question else "_(question not stored)_"
        blocks.append({"type": "section", "text": mrkdwn(
            f"*{downs}× 👎* · `{msg.model_version or 'unknown'}`\n>{q}\n{_short(msg.text)}")})
    if settings.is_admin(user):
        blocks += [{"type": "divider"}, {"type": "context", "elements": [mrkdwn(
            "You are a Flywheel admin: `/flywheel train`, `/flywheel approve <version>`, "
            "`/flywheel rollback`. Reports arrive in "
            + (f"<#{settings.admin_channel}>" if settings.admin_channel else "the admin channel (unset)") + ".")]}]
    return {"type": "home", "blocks": blocks[:100]}


def publish_home(settings: BotSettings, client: WebClient, user: str) -> None:
    try:
        client.views_publish(user_id=user, view=home_view(settings, user))
    except SlackApiError as exc:
        log.error("cannot publish App Home", user=user, error=exc.response.get("error"))
