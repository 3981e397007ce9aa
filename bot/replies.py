"""How an answer reaches Slack while it is written, two ways with one interface:
- streamed natively (chat.startStream / appendStream / stopStream): the text grows in the message
  and the feedback buttons come with the final part; Slack streams only replies in a thread;
- a placeholder ("Thinking…") rewritten with chat.update: everywhere else, and wherever a
  workspace refuses the streaming methods (then the bot stops trying for a while).

Either way the first final message wins: the deadline's apology is never overwritten by a late
answer, and no progress lands after a final message (updates hold the lock while in flight)."""
from __future__ import annotations

import threading
import time

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot import blocks, metrics
from bot.slack_text import escape
from flywheel.logs import get_logger

log = get_logger("bot.replies")

STREAM_TEXT_LIMIT = 12_000  # characters per appendStream / stopStream call


class UpdatedReply:
    """The placeholder and the one final message it becomes."""

    kind = "update"

    def __init__(self, client: WebClient, channel: str, ts: str) -> None:
        self.client, self.channel, self.ts = client, channel, ts
        self.final = False
        self._lock = threading.Lock()

    def progress(self, text_so_far: str) -> None:
        with self._lock:
            if self.final:
                return
            try:
                self.client.chat_update(channel=self.channel, ts=self.ts, text=text_so_far,
                                        blocks=blocks.streaming_blocks(text_so_far))
            except SlackApiError as exc:  # progress is best effort; the final update matters
                log.warning("progress update failed", error=exc.response.get("error"))

    def finish(self, text: str, shown: list[dict]) -> bool:
        """Show the final message; False when another was shown first or Slack refused it."""
        with self._lock:
            if self.final:
                return False
            self.final = True
            return self._update(text, shown)

    def _update(self, text: str, shown: list[dict]) -> bool:
        try:
            self.client.chat_update(channel=self.channel, ts=self.ts, text=text[:3000], blocks=shown)
            return True
        except SlackApiError as exc:
            metrics.ANSWERS.labels("slack_error").inc()
            log.error("cannot show the answer", channel=self.channel, ts=self.ts, error=exc.response.get("error"))
            return False

    def apologize(self, text: str) -> bool:
        return self.finish(text, [{"type": "section", "text": blocks.mrkdwn(text)}])


class StreamedReply(UpdatedReply):
    """A natively streamed message: appends carry only the new text; the final call adds the
    rest and the answer's footer (source, version, feedback buttons). Should Slack refuse an
    append or the stop (a stream expires), the message is finished with chat.update instead."""

    kind = "stream"

    def __init__(self, client: WebClient, channel: str, ts: str) -> None:
        super().__init__(client, channel, ts)
        self.sent = ""  # the (escaped) text Slack already shows
        self.broken = False

    def progress(self, text_so_far: str) -> None:
        with self._lock:
            shown = escape(text_so_far.strip())  # as the final text will be: stripped
            if self.final or self.broken or not shown.startswith(self.sent) or shown == self.sent:
                return
            try:
                self.client.chat_appendStream(channel=self.channel, ts=self.ts,
                                              markdown_text=shown[len(self.sent):][:STREAM_TEXT_LIMIT])
                self.sent = shown
            except SlackApiError as exc:
                self.broken = True
                log.warning("stream append failed; the final message replaces it",
                            error=exc.response.get("error"))

    def finish(self, text: str, shown: list[dict]) -> bool:
        full = escape(text)
        rest = full[len(self.sent):] if full.startswith(self.sent) else None
        fits = rest is not None and len(rest) <= STREAM_TEXT_LIMIT
        return self._end(text, shown, stop_text=rest if fits else None,
                         footer=[b for b in shown if b.get("type") != "section"])

    def apologize(self, text: str) -> bool:
        """The apology ends the stream (after whatever part of an answer was shown)."""
        return self._end(text, [{"type": "section", "text": blocks.mrkdwn(text)}],
                         stop_text=("\n\n" if self.sent else "") + text, footer=[])

    def _end(self, text: str, shown: list[dict], *, stop_text: str | None, footer: list[dict]) -> bool:
        """The one final message: the stream stopped with `stop_text` and `footer` when it can be,
        else (a broken stream, text that no longer continues what was sent, a refused stop) the
        message rewritten with chat.update. False when another final message came first."""
        with self._lock:
            if self.final:
                return False
            self.final = True
            if not self.broken and stop_text is not None:
                try:
                    self.client.chat_stopStream(channel=self.channel, ts=self.ts, markdown_text=stop_text or None,
                                                blocks=footer or None)
                    return True
                except SlackApiError as exc:
                    log.warning("stream stop failed; finishing with chat.update", error=exc.response.get("error"))
            self._close_stream()
            return self._update(text, shown)

    def _close_stream(self) -> None:
        try:
            self.client.chat_stopStream(channel=self.channel, ts=self.ts)
        except SlackApiError:
            pass  # already stopped or expired: chat.update does the rest


class Progress:
    """Shows the answer growing, at most one Slack call per interval."""

    def __init__(self, reply: UpdatedReply, interval_s: float) -> None:
        self.reply, self.interval = reply, interval_s
        self.last = time.monotonic()

    def __call__(self, text_so_far: str) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return
        self.last = now
        self.reply.progress(text_so_far)


class ReplyOpener:
    """Starts a reply: a native stream where Slack allows one (in a thread), else a placeholder.
    A workspace that refuses streaming is not asked again for `retry_s`."""

    def __init__(self, streaming: bool, retry_s: float = 600.0) -> None:
        self.streaming, self.retry_s = streaming, retry_s
        self._refused_until = 0.0

    def open(self, client: WebClient, channel: str, thread_ts: str | None, *, user: str | None,
             team: str | None) -> UpdatedReply:
        """Raises SlackApiError when not even the placeholder can be posted."""
        if self.streaming and thread_ts and time.monotonic() >= self._refused_until:
            try:
                started = client.chat_startStream(channel=channel, thread_ts=thread_ts, recipient_user_id=user,
                                                  recipient_team_id=team)
                metrics.REPLIES.labels("stream").inc()
                return StreamedReply(client, channel, started["ts"])
            except SlackApiError as exc:
                error = exc.response.get("error")
                if error != "ratelimited":
                    self._refused_until = time.monotonic() + self.retry_s
                log.info("streaming refused; placeholder and updates instead", error=error)
        placeholder = client.chat_postMessage(channel=channel, thread_ts=thread_ts, text=blocks.THINKING)
        metrics.REPLIES.labels("update").inc()
        return UpdatedReply(client, channel, placeholder["ts"])
