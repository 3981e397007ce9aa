"""A correction of an answer taken from a document flags the section as possibly out of date
(issue 28): the answer recorded the memory items it cited (`Message.cited`), and a correction of
it, stored, names each cited section whose text is still the one the answer was given. Each is
audited (`section.flagged`, target `section ID`: seen without Slack) and the correction is posted
once to the admin channel. As in bot/review.py and bot/docreview.py nothing private reaches that
shared channel: a document imported for one channel is named by its ids only, and a correction
made in a DM or a private channel is not quoted."""
from __future__ import annotations

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot.blocks import mrkdwn
from bot.channels import ChannelVisibility
from bot.settings import BotSettings
from bot.slack_text import escape_within
from flywheel.logs import get_logger
from store.db import session_scope
from store.documents import flag_cited_sections
from store.models import Document, DocumentSection, Message
from store.models import Feedback as FeedbackRow

log = get_logger("bot.docflags")


def flag_sections(settings: BotSettings, visibility: ChannelVisibility, client: WebClient, row: FeedbackRow,
                  msg: Message) -> int:
    """After the correction `row` of the answer `msg` is stored: flag the sections it cited, audited,
    in one post to the admin channel; how many sections."""
    if not msg.cited:
        return 0
    with session_scope() as s:
        cited = flag_cited_sections(s, msg.cited, actor=row.user, feedback_id=row.id, message_id=msg.id)
    if not cited or not settings.admin_channel:
        return len(cited)
    quoted = all(doc.visible_in is None for doc, _s in cited) and visibility.visible_in(client, msg.channel) is None
    text = flag_text(cited, row.user, row.correction if quoted else None)
    try:
        client.chat_postMessage(channel=settings.admin_channel, text=text,
                                blocks=[{"type": "section", "text": mrkdwn(text)}])
    except SlackApiError as exc:  # audited already: the audit log shows the flag
        log.warning("cannot post the flagged sections", message_id=msg.id, error=exc.response.get("error"))
    log.info("sections flagged by a correction", message_id=msg.id, sections=[s.id for _d, s in cited])
    return len(cited)


def flag_text(cited: list[tuple[Document, DocumentSection]], user: str, correction: str | None) -> str:
    """'An answer taken from *Onboarding › Laptops* (imported 2 Dec) was corrected by <@U1>: the
    section may be out of date', then the correction (None: not for the admin channel's eyes)."""
    names = [_name(doc, section) for doc, section in cited]
    what = "the section may" if len(cited) == 1 else "these sections may"
    head = f"An answer taken from {'; '.join(names)} was corrected by <@{user}>: {what} be out of date."
    if correction is None:
        return head + "\n_The correction is not quoted here: its conversation or the document is not everyone's._"
    return head + f"\n*Their answer:* {escape_within(correction, 2000)}"


def _name(doc: Document, section: DocumentSection) -> str:
    """A section as the admin channel may show it: its title path (under the document's title
    when that path does not start with it) and when its text was imported; a document imported
    for one channel only by its ids."""
    if doc.visible_in is not None:
        return f"section {section.id} of document {doc.id} (visible only in <#{doc.visible_in}>)"
    path = section.title if section.title.split(" › ")[0] == doc.title else f"{doc.title} › {section.title}"
    when = section.updated_at
    return f"*{escape_within(path, 300).replace('*', '')}* (imported {when.day} {when:%b})"
