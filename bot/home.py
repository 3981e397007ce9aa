"""App Home: what the bot serves and how training goes; the team's figures and its worst
(public) answers for admins and reviewers, and each person's own figures for everyone else."""
from __future__ import annotations

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot.admin import examples_summary, feedback_summary, run_line
from bot.blocks import mrkdwn, plain
from bot.channels import ChannelVisibility
from bot.settings import BotSettings
from bot.slack_text import escape_within
from bot.watch import compare, describe
from flywheel.prompt import normalize
from flywheel.logs import get_logger
from store.conversations import previous_user_message
from store.db import session_scope
from store.feedback import top_downvoted_answers
from store.overview import overview, personal_overview

log = get_logger("bot.home")
WORST_SHOWN, WORST_CANDIDATES = 5, 50  # candidates: room for the DM answers that are skipped
_visibility = ChannelVisibility()  # for callers without the app's (the app passes the feedback's cache)


def _short(text: str, n: int = 150) -> str:
    return escape_within(" ".join(text.split()), n)


def _shareable(client: WebClient | None, channel: str, visibility: ChannelVisibility) -> bool:
    """Only answers from public channels are quoted, even to admins: a DM (or a private
    channel) stays between the people in it."""
    return client is not None and visibility.is_public(client, channel)


def _team_blocks(o, worst) -> list[dict]:
    """For admins and reviewers: the team's figures and where the bot answers worst."""
    out = [
        {"type": "section", "fields": [
            mrkdwn(f"*Questions*\n{o.questions}"), mrkdwn(f"*Answers*\n{o.answers}"),
            mrkdwn(f"*Examples*\n{examples_summary(o.examples)}"),
            mrkdwn(f"*Feedback*\n{feedback_summary(o.feedback)}"),
        ]},
        {"type": "divider"},
        {"type": "section", "text": mrkdwn("*Most 👎 answers* (public channels)")},
    ]
    if not worst:
        out.append({"type": "context", "elements": [mrkdwn("No 👎 in public channels yet.")]})
    for msg, downs, question in worst:
        q = _short(normalize(question.text)) if question else "_(question not stored)_"
        out.append({"type": "section", "text": mrkdwn(
            f"*{downs}× 👎* · `{msg.model_version or 'unknown'}` · <#{msg.channel}>\n>{q}\n{_short(msg.text)}")})
    return out


def _own_blocks(mine) -> list[dict]:
    """For everyone else: their own figures only."""
    return [{"type": "section", "fields": [
        mrkdwn(f"*Your questions*\n{mine.questions}"),
        mrkdwn(f"*Your feedback*\n{feedback_summary(mine.feedback)}"),
    ]}]


def home_view(settings: BotSettings, user: str, client: WebClient | None = None,
              visibility: ChannelVisibility | None = None) -> dict:
    """Admins and reviewers see the team's figures and the worst public answers; everyone else
    sees only their own figures. Production and training runs are no one's private data."""
    staff = settings.is_reviewer(user)
    with session_scope() as s:
        o = overview(s, runs=5)
        if staff:
            candidates = top_downvoted_answers(s, limit=WORST_CANDIDATES)
            worst = [(m, n, previous_user_message(s, m)) for m, n in candidates
                     if _shareable(client, m.channel, visibility or _visibility)][:WORST_SHOWN]
        else:
            mine = personal_overview(s, user)
    blocks = [
        {"type": "header", "text": plain("Flywheel")},
        {"type": "section", "text": mrkdwn(f"*Production model:* `{o.production or 'base model'}`")},
        {"type": "section", "text": mrkdwn("*Last training runs*\n" + (
            "\n".join(f"• {run_line(r)}" for r in o.runs) if o.runs else "_none yet_"))},
    ]
    blocks += _team_blocks(o, worst) if staff else _own_blocks(mine)
    if settings.is_admin(user):
        blocks += [{"type": "divider"}, {"type": "section", "text": mrkdwn(
            escape_within(describe(compare(), settings.watch_min_answers), 2900))}]
        blocks += [{"type": "divider"}, {"type": "context", "elements": [mrkdwn(
            "You are a Flywheel admin: `/flywheel train`, `/flywheel approve <version>`, "
            "`/flywheel rollback`. Reports arrive in "
            + (f"<#{settings.admin_channel}>" if settings.admin_channel else "the admin channel (unset)") + ".")]}]
    return {"type": "home", "blocks": blocks[:100]}


def publish_home(settings: BotSettings, client: WebClient, user: str,
                 visibility: ChannelVisibility | None = None) -> None:
    try:
        client.views_publish(user_id=user, view=home_view(settings, user, client, visibility))
    except SlackApiError as exc:
        log.error("cannot publish App Home", user=user, error=exc.response.get("error"))
