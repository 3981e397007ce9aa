"""Slack's AI surfaces. The Agent messaging experience (manifest `agent_view`): when someone opens
the app's Messages tab the bot sets its suggested prompts for that DM (no thread: Slack ignores
a call with thread_ts there). The older assistant view (`assistant_view`, still working where a
workspace has it): a new assistant thread is greeted with suggested prompts. In both, while an
answer is written the thread shows "is thinking…", and the first question names the thread. Everything here is best effort: without the assistant feature (a
plain DM thread, an app without `assistant:write`) the calls fail, are counted, and the answer
is given all the same."""
from __future__ import annotations

from collections import Counter

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot import metrics
from bot.channels import ChannelVisibility
from bot.settings import BotSettings
from flywheel.logs import describe_exception, get_logger
from flywheel.prompt import normalize
from store.conversations import recent_questions
from store.db import session_scope

log = get_logger("bot.assistant")

MAX_PROMPTS = 4  # Slack shows at most four suggested prompts
TITLE_CHARS = 60
STATUS = "is thinking…"
FALLBACK_PROMPTS = ("What can you help me with?", "How do I teach you a better answer?")


def most_asked(rows: list[tuple[str, str]], is_public, *, bot_user_id: str | None, limit: int = MAX_PROMPTS) -> list[str]:
    """The questions asked most often (in their most frequent wording) in public channels only: a
    suggestion is shown to anyone, so nothing asked in a private channel may become one."""
    counts: Counter[str] = Counter()
    wordings: dict[str, Counter[str]] = {}
    for text, channel in rows:
        question = normalize(text, bot_user_id=bot_user_id)
        key = " ".join(question.lower().rstrip("?!. ").split())
        if len(key) < 8 or len(question) > 150 or not is_public(channel):
            continue
        counts[key] += 1
        wordings.setdefault(key, Counter())[question] += 1
    return [wordings[key].most_common(1)[0][0] for key, _n in counts.most_common(limit)]


class Assistant:
    def __init__(self, settings: BotSettings, visibility: ChannelVisibility) -> None:
        self.settings = settings
        self.visibility = visibility

    def _call(self, name: str, fn, **kwargs) -> bool:
        try:
            fn(**kwargs)
            metrics.ASSISTANT.labels(name, "ok").inc()
            return True
        except SlackApiError as exc:
            metrics.ASSISTANT.labels(name, "refused").inc()
            log.info("assistant call refused", call=name, error=exc.response.get("error"))
            return False

    def prompts(self, client: WebClient, bot_user_id: str | None) -> list[str]:
        if self.settings.suggested_prompts:
            return self.settings.suggested_prompts[:MAX_PROMPTS]
        try:
            with session_scope() as s:
                rows = recent_questions(s)
            asked = most_asked(rows, lambda ch: self.visibility.is_public(client, ch), bot_user_id=bot_user_id)
        except Exception as exc:  # the store is down: suggest something all the same
            log.warning("cannot read the most asked questions", error=describe_exception(exc))
            asked = []
        return asked or list(FALLBACK_PROMPTS)

    def _prompt_list(self, client: WebClient, bot_user_id: str | None) -> list[dict]:
        return [{"title": p if len(p) <= 75 else p[:74] + "…", "message": p} for p in self.prompts(client, bot_user_id)]

    def on_messages_opened(self, event: dict, client: WebClient, bot_user_id: str | None) -> None:
        """Agent view: someone opened the app's Messages tab; suggest what to ask there."""
        channel = event.get("channel")
        if not channel:
            metrics.IGNORED.labels("agent_view_without_channel").inc()
            return
        self._call("suggested_prompts", client.assistant_threads_setSuggestedPrompts, channel_id=channel,
                   title="Try asking", prompts=self._prompt_list(client, bot_user_id))

    def on_thread_started(self, event: dict, client: WebClient, bot_user_id: str | None) -> None:
        """A person opened the assistant view: greet them and suggest what to ask."""
        thread = event.get("assistant_thread") or {}
        channel, thread_ts = thread.get("channel_id"), thread.get("thread_ts")
        if not channel or not thread_ts:
            metrics.IGNORED.labels("assistant_thread_without_ids").inc()
            return
        self._call("greeting", client.chat_postMessage, channel=channel, thread_ts=thread_ts,
                   text=self.settings.assistant_greeting)
        self._call("suggested_prompts", client.assistant_threads_setSuggestedPrompts, channel_id=channel,
                   thread_ts=thread_ts, title="Try asking", prompts=self._prompt_list(client, bot_user_id))

    def thinking(self, client: WebClient, channel: str, thread_ts: str, question: str, *, first: bool,
                 bot_user_id: str | None) -> None:
        """Show "is thinking…" (Slack clears it when the answer is posted); name a new thread."""
        self._call("status", client.assistant_threads_setStatus, channel_id=channel, thread_ts=thread_ts,
                   status=STATUS)
        if first:
            title = normalize(question, bot_user_id=bot_user_id)
            title = title if len(title) <= TITLE_CHARS else title[:TITLE_CHARS - 1] + "…"
            if title:
                self._call("title", client.assistant_threads_setTitle, channel_id=channel, thread_ts=thread_ts,
                           title=title)
