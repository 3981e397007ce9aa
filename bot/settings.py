"""Bot settings from the environment: Slack's own variable names for Slack credentials,
FLYWHEEL_-prefixed names for everything else (so one .env serves every package)."""
from __future__ import annotations

import json
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flywheel.env_lists import split_csv

SLACK_API_URL = "https://slack.com/api/"




def _split_mapping(value) -> dict[str, str]:
    """Label emojis come as 'emoji=label,emoji=label' (a JSON object also works)."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("{"):
            value = json.loads(value)
        else:
            pairs = [p for p in value.split(",") if p.strip()]
            bad = [p for p in pairs if "=" not in p]
            if bad:
                raise ValueError(f"label emojis must look like 'emoji=label,emoji=label'; got {bad[0]!r}")
            value = dict(p.split("=", 1) for p in pairs)
    out = {}
    for emoji, label in dict(value).items():
        emoji, label = str(emoji).strip().strip(":"), str(label).strip()
        if not emoji or not label:
            raise ValueError(f"empty emoji or label in label emojis: {emoji!r}={label!r}")
        out[emoji] = label
    return out


def _slack(name: str, **kw):
    """A field read from Slack's conventional variable name (no prefix)."""
    return Field(validation_alias=AliasChoices(name, name.lower()), **kw)


class BotSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore", populate_by_name=True)

    slack_bot_token: str | None = _slack("SLACK_BOT_TOKEN", default=None)
    slack_signing_secret: str | None = _slack("SLACK_SIGNING_SECRET", default=None)
    slack_app_token: str | None = _slack("SLACK_APP_TOKEN", default=None)
    slack_api_url: str = _slack("SLACK_API_URL", default=SLACK_API_URL)

    gateway_url: str = "http://127.0.0.1:8000"
    gateway_api_key: str | None = None
    gateway_admin_token: str | None = None
    gateway_model: str = "production"
    gateway_timeout_s: float = Field(default=120.0, gt=0)
    # A gateway restarting (connection refused, then 503 while its model loads) is retried with
    # short backoff for at most this many seconds in all before the user gets an apology; 0: never.
    gateway_connect_retry_s: float = Field(default=30.0, ge=0)
    # Each answer's total budget from its question to the final message; past it the
    # placeholder becomes an apology and the worker lets go.
    answer_deadline_s: float = Field(default=120.0, gt=0)
    stream: bool = True
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.2, ge=0)

    admins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # People who may approve corrections, 👍s and "Add to training data" besides the admins (they
    # cannot promote models).
    reviewers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Corrections, 👍s and "Add to training data" from people who are neither admins nor reviewers
    # wait for a review before the memory or the trainer use them; off: all count at once.
    review_corrections: bool = True
    admin_channel: str | None = None

    up_emojis: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["+1", "thumbsup", "white_check_mark", "heavy_check_mark"])
    down_emojis: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["-1", "thumbsdown", "x"])
    label_emojis: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: {"question": "unclear", "warning": "unsafe", "zzz": "off-topic"})
    # Slack's native text streaming for answers in threads (chat.startStream / appendStream /
    # stopStream); where a workspace refuses it, the bot uses a placeholder + chat.update.
    slack_streaming: bool = True
    # Slack's assistant view: the greeting of a new assistant thread and its suggested prompts
    # (up to 4, "|"-separated or a JSON list; empty: the team's most asked questions in public channels).
    assistant_greeting: str = ("Hi! Ask me anything about the team's work. Rate my answers with 👍 / 👎 "
                               "and suggest better ones: I learn from them.")
    suggested_prompts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The live-version watch: once the promoted version gave this many answers and P(it is worse
    # than the one before, by 👎 and corrections) reaches watch_alert_p, admins get a Rollback button.
    watch_min_answers: int = Field(default=30, ge=1)
    watch_alert_p: float = Field(default=0.9, gt=0.5, le=1.0)
    # Canary: the share of people (sticky by user) a version on the `candidate` alias answers
    # (`/flywheel canary <version>`); 0 turns canaries off for this deployment.
    canary_percent: float = Field(default=0.0, ge=0.0, le=100.0)
    # Buttons under each answer: Slack's feedback_buttons element, or classic buttons.
    feedback_style: str = "feedback_buttons"

    # Seconds between placeholder updates while an answer streams (chat.update is rate limited).
    stream_update_interval_s: float = Field(default=1.5, gt=0)
    slack_retries: int = Field(default=3, ge=0)
    # Report poller: posts run progress and reports to the admin channel.
    report_interval_s: float = Field(default=5.0, gt=0)
    reports_enabled: bool = True
    # Runs older than this are never reported (a bot configured late does not flood the channel).
    report_backlog_days: float = Field(default=7.0, gt=0)
    # Answer workers. Questions wait for one in a line per person, the lines served in turn: one
    # person has at most answer_user_running answers being written and answer_user_queue waiting
    # (beyond that, or with answer_queue waiting in all, they are told to try again in a moment).
    # So a person flooding the bot delays anyone else's question by no more than answering with
    # answer_user_running fewer workers would (keep it below listener_threads).
    listener_threads: int = Field(default=16, ge=1)
    answer_user_running: int = Field(default=2, ge=1)
    answer_user_queue: int = Field(default=5, ge=1)
    answer_queue: int = Field(default=256, ge=1)
    # Threads that take events as they arrive (store the question, post "Thinking…" at once, queue
    # it for an answer worker; reactions, App Home).
    event_threads: int = Field(default=8, ge=1)
    # On SIGTERM: how long the answers being written and waiting may take to finish before the rest
    # turn into apologies (HTTP mode: the front waits this long and 5 s more for its worker).
    answer_drain_s: float = Field(default=15.0, ge=0)
    # How long a channel's visibility (public, private, Slack Connect) is trusted before Slack is
    # asked again; Slack's channel_shared / channel_unshared / made-private events refresh it at once.
    channel_visibility_ttl_s: float = Field(default=600.0, gt=0)
    # Conversations nobody taught from (no vote, label or correction) are deleted once their last
    # message is this many days old, at start-up and every retention_sweep_s; 0: kept forever.
    retention_days: float = Field(default=0.0, ge=0)
    retention_sweep_s: float = Field(default=3600.0, gt=0)
    # How long a reaction or vote waits for an unavailable database before it is given up.
    feedback_retry_s: float = Field(default=120.0, ge=0)
    # Workers for slash commands, buttons and modals, apart from the answer workers, so
    # `/flywheel rollback` runs while every answer is stuck.
    command_threads: int = Field(default=4, ge=1)
    # Slack requests larger than this get 413 before anything reads them (Slack's are a few KB).
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # HTTP mode: a lean process (bot/front.py) checks and acks Slack's requests and hands them to
    # the bot in a worker process over a Unix socket, so Bolt's threads and the big heap's garbage
    # collections never hold up an ack; 0 serves everything from one process (Socket Mode always does).
    bot_ack_process: bool = True
    # Events the front acked and has yet to hand to the worker; when it is full (the worker falls
    # behind) or the worker is down, events are refused with 503 and Slack delivers them again.
    # A burst is absorbed here (300 events at once filled 256 while the worker took ~100/s); an
    # event is a few KB, so 4096 stay under ~20 MB.
    bot_ack_queue: int = Field(default=4096, ge=1)

    @field_validator("suggested_prompts", mode="before")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [p.strip() for p in value.split("|") if p.strip()]
        return value

    @field_validator("admins", "reviewers", "up_emojis", "down_emojis", mode="before")
    @classmethod
    def _csv(cls, value):
        return split_csv(value, strip=":")

    @field_validator("label_emojis", mode="before")
    @classmethod
    def _mapping(cls, value):
        return _split_mapping(value)

    @field_validator("slack_api_url", "gateway_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"URL {value!r} must start with http:// or https://")
        return value

    @field_validator("feedback_style")
    @classmethod
    def _style(cls, value: str) -> str:
        if value not in ("feedback_buttons", "buttons"):
            raise ValueError(f"feedback style {value!r}: use feedback_buttons or buttons")
        return value

    @model_validator(mode="after")
    def _emojis_disjoint(self):
        clash = (set(self.up_emojis) & set(self.down_emojis)) | (
            (set(self.up_emojis) | set(self.down_emojis)) & set(self.label_emojis))
        if clash:
            raise ValueError(f"emoji(s) {sorted(clash)} mapped twice (up, down and label emojis must differ)")
        return self

    @property
    def api_base_url(self) -> str:
        """WebClient wants the trailing slash."""
        return self.slack_api_url if self.slack_api_url.endswith("/") else self.slack_api_url + "/"

    def is_admin(self, user_id: str | None) -> bool:
        return bool(user_id) and user_id in self.admins

    def is_reviewer(self, user_id: str | None) -> bool:
        """Admins review too; reviewers only review."""
        return self.is_admin(user_id) or (bool(user_id) and user_id in self.reviewers)

    def require_http_credentials(self) -> None:
        """Fail early, naming the variable, instead of a Bolt traceback."""
        missing = [n for n, v in (("SLACK_BOT_TOKEN", self.slack_bot_token),
                                  ("SLACK_SIGNING_SECRET", self.slack_signing_secret)) if not v]
        if missing:
            raise ValueError(f"missing setting(s): {', '.join(missing)} (set them in the environment)")
