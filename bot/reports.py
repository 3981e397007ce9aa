"""Training reports in the admin channel: one message per run, updated as it progresses, and
when the run finishes the metrics table, the gate verdict, the plot and Approve / Reject. The same
rounds post documents' generated questions waiting for review (bot/docreview.py)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from datetime import timedelta

from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot import metrics
from bot.admin import Admin, run_line
from bot.blocks import REPORT_APPROVE, REPORT_REJECT, WATCH_STOP_CANARY, mrkdwn, plain
from bot.docreview import post_waiting
from bot.periodic import Periodic
from bot.settings import BotSettings
from bot.slack_text import escape, escape_within
from bot.watch import VersionWatch
from flywheel.logs import get_logger
from store.db import session_scope
from store.leases import acquire_lease, release_lease
from store.models import ModelVersion, RunStatus, TrainingRun, VersionStatus, utcnow
from store.runs import FINISHED, mark_run_reported, runs_to_report, set_report_message
from store.versions import find_version, report_plot

log = get_logger("bot.reports")
LEASE = "bot-reports"
WATCH_EVERY_S = 30.0  # how often the poster compares the live version with the one before
MODEL_ORDER = ("candidate", "production", "base")


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def metrics_table(report: dict) -> str:
    """{"candidate": {"token_f1": 0.8}, "production": {...}, "base": {...}} as aligned text."""
    models = [m for m in MODEL_ORDER if isinstance(report.get(m), dict)]
    models += [m for m, v in report.items() if isinstance(v, dict) and m not in models]
    names: list[str] = []
    for m in models:
        names += [k for k, v in report[m].items() if not isinstance(v, (dict, list)) and k not in names]
    if not models or not names:
        return ""
    rows = [["metric", *models]] + [[n, *(_fmt(report[m].get(n, "–")) for m in models)] for n in names]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    return "\n".join(lines)


def _task(task_id: str, title: str, status: str, details: str | None = None) -> dict:
    card = {"type": "task_card", "task_id": task_id, "title": title, "status": status}
    if details:
        card["details"] = {"type": "rich_text", "elements": [
            {"type": "rich_text_section", "elements": [{"type": "text", "text": details}]}]}
    return card


def progress_plan(run: TrainingRun, loss: float | None) -> dict:
    """A running run's stages as Slack's plan block (task cards: pending → in progress → complete)."""
    running = run.status == RunStatus.running
    built = run.dataset_snapshot_id is not None
    trained = built and run.total_steps > 0 and run.step >= run.total_steps
    steps = f"step {run.step}/{run.total_steps}" if run.total_steps else None
    detail = " · ".join(x for x in (steps, f"loss {loss:.4f}" if loss is not None else None) if x) or None

    def state(done: bool, started: bool) -> str:
        return "complete" if done else "in_progress" if running and started else "pending"

    return {"type": "plan", "title": f"Training run #{run.id}"[:150], "tasks": [
        _task("dataset", "Build the dataset", state(built, True)),
        _task("train", "Fine-tune the adapter (LoRA)", state(trained, built), detail),
        _task("evaluate", "Evaluate against production and the golden set", state(False, trained)),
        _task("register", "Gate and register the version", "pending")]}


def report_blocks(run: TrainingRun, version: ModelVersion | None, final: bool, plan: bool = True) -> list[dict]:
    """The run's message: while it runs, its progress (with the stages as a plan block where the
    workspace has them); when it ends, the verdict, the metrics and the decision buttons."""
    title = f"Training run #{run.id}" + (f": {version.name}" if version else "")
    blocks: list[dict] = [{"type": "header", "text": plain(title[:150])}]
    who = f"queued by <@{run.queued_by}>" if run.queued_by else "scheduled"
    if not final:
        loss = next((p.get("loss") for p in reversed(run.metrics or []) if p.get("loss") is not None), None)
        loss = loss if isinstance(loss, (int, float)) else None
        status = run_line(run) + (f" · loss {loss:.4f}" if loss is not None else "")
        blocks.append({"type": "section", "text": mrkdwn(f"{status}\n_{who}_")})
        if plan:
            blocks.append(progress_plan(run, loss))
        return blocks
    if run.status == RunStatus.failed:
        blocks.append({"type": "section", "text": mrkdwn(
            f":x: *Failed*: {escape_within(run.error or 'no error recorded', 2500)}\n_{who}_")})
        return blocks
    if version is None:
        blocks.append({"type": "section", "text": mrkdwn(f"Run {run.status}, no new model version. _{who}_")})
        return blocks
    verdict = ":white_check_mark: *Gate passed*" if version.gate_passed else ":x: *Gate failed*"
    reasons = escape_within("\n".join(f"• {r}" for r in version.gate_reasons or []), 2800)
    blocks.append({"type": "section", "text": mrkdwn(f"{verdict}\n{reasons}".strip())})
    table = metrics_table(version.report or {})
    if table:
        blocks.append({"type": "section", "text": mrkdwn(f"```{table[:2800]}```")})
    blocks.append({"type": "context", "elements": [mrkdwn(
        f"{who} · base `{escape(version.base_model)}` · {run.total_steps} steps")]})
    if version.status in (VersionStatus.candidate, VersionStatus.approved):
        buttons = [{"type": "button", "action_id": REPORT_REJECT, "text": plain("Reject"), "style": "danger",
                    "value": version.name}]
        if version.gate_passed:
            buttons.insert(0, {
                "type": "button", "action_id": REPORT_APPROVE, "text": plain("Approve"), "style": "primary",
                "value": version.name,
                "confirm": {"title": plain("Promote to production?"), "confirm": plain("Promote"),
                            "deny": plain("Cancel"),
                            "text": mrkdwn(f"`{version.name}` will serve every answer.")}})
        blocks.append({"type": "actions", "block_id": "report_actions", "elements": buttons})
    elif not version.gate_passed:
        blocks.append({"type": "context", "elements": [mrkdwn(
            f'An admin can still override: `/flywheel approve {version.name} --force "reason"`')]})
    return blocks


class ReportPoller:
    """A background thread; with several bot replicas a store lease keeps it to one poster."""

    def __init__(self, settings: BotSettings, client: WebClient, owner: str | None = None) -> None:
        self.settings, self.client = settings, client
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self._shown: dict[int, str] = {}
        self._plans = True  # task / plan blocks until the workspace refuses them
        self.watch = VersionWatch(settings, client)
        self._watched_at = 0.0
        self.rounds = Periodic("report-poller", settings.report_interval_s, self.poll_once)

    def start(self) -> None:
        if not self.settings.admin_channel:
            log.warning("FLYWHEEL_ADMIN_CHANNEL unset: training reports will not be posted")
            return
        self.rounds.start()

    def stop(self) -> None:
        if self.rounds.stop():
            with session_scope() as s:
                release_lease(s, LEASE, self.owner)

    def poll_once(self) -> int:
        """Post or update every unreported run's message; returns how many Slack writes it made."""
        ttl = max(30.0, 3 * self.settings.report_interval_s)
        since = utcnow() - timedelta(days=self.settings.report_backlog_days)
        with session_scope() as s:
            if not acquire_lease(s, LEASE, self.owner, ttl):
                return 0
            work = []
            for run in runs_to_report(s, since=since):
                version = find_version(s, run.model_version) if run.model_version else None
                work.append((run, version))
        writes = sum(self._show(run, version) for run, version in work)
        writes += post_waiting(self.settings, self.client)  # documents' questions for review
        if time.monotonic() - self._watched_at >= WATCH_EVERY_S:  # the live version, on real answers
            self._watched_at = time.monotonic()
            writes += self.watch.check()
        return writes

    def _show(self, run: TrainingRun, version: ModelVersion | None) -> int:
        final = run.status in FINISHED and (run.model_version is None or version is not None)
        shown = report_blocks(run, version, final, plan=self._plans)
        text = f"Training run #{run.id}: {run.status}"
        digest = hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()
        channel, ts = run.report_channel or self.settings.admin_channel, run.report_ts
        try:
            if ts is None:
                ts = self.client.chat_postMessage(channel=channel, text=text, blocks=shown)["ts"]
                with session_scope() as s:
                    if not set_report_message(s, run.id, channel=channel, ts=ts):
                        log.warning("another poster owns this run's message", run_id=run.id)
                        return 1
                metrics.REPORTS.labels("post").inc()
            elif self._shown.get(run.id) != digest:
                self.client.chat_update(channel=channel, ts=ts, text=text, blocks=shown)
                metrics.REPORTS.labels("update").inc()
            else:
                return 0
            self._shown[run.id] = digest
            if final:
                self._upload_plot(channel, ts, version)
                with session_scope() as s:
                    mark_run_reported(s, run.id)
                self._shown.pop(run.id, None)
                log.info("run reported", run_id=run.id, version=version.name if version else None)
            return 1
        except SlackApiError as exc:
            if self._plans and not final and exc.response.get("error") == "invalid_blocks":
                self._plans = False  # this workspace has no task / plan blocks: the plain progress line
                log.info("plan blocks refused; progress without them", run_id=run.id)
                return self._show(run, version)
            log.error("cannot post the run report", run_id=run.id, channel=channel,
                      error=exc.response.get("error"))
            return 0

    def _upload_plot(self, channel: str, ts: str, version: ModelVersion | None) -> None:
        """The evaluation plot, from the store (the trainer registered it with the version)."""
        if version is None:
            return
        with session_scope() as s:
            png = report_plot(s, version.name)
        if png is None:
            if version.report_path:  # registered without its plot (an older trainer)
                self.client.chat_postMessage(channel=channel, thread_ts=ts,
                                             text=f"(the evaluation plot of `{version.name}` is not in the store)")
            return
        self.client.files_upload_v2(channel=channel, thread_ts=ts, content=png, filename=f"{version.name}.png",
                                    title=f"{version.name} evaluation")
        metrics.REPORTS.labels("plot").inc()


def on_report_button(admin: Admin, ack, body: dict, client: WebClient, respond) -> None:
    """Approve / Reject under a report: the same admin checks and audit as the commands; the
    report message then says who decided, and the buttons go away."""
    ack()
    action = body["actions"][0]
    user, version = body["user"]["id"], action.get("value") or ""
    if action["action_id"] == REPORT_APPROVE:
        reply = admin.admin_action(user, "approve", version, lambda: admin.approve(user, version),
                                   detail={"via": "report button"})
    else:
        reply = admin.admin_action(user, "reject", version, lambda: admin.reject(user, version),
                                   detail={"via": "report button"})
    _decided(reply, body, client, respond)


def on_watch_button(admin: Admin, ack, body: dict, client: WebClient, respond) -> None:
    """Roll back (or stop the canary) under a version-watch alert: only while the version it
    names is still the one live (or on canary)."""
    ack()
    action = body["actions"][0]
    user, version = body["user"]["id"], action.get("value") or ""
    if action["action_id"] == WATCH_STOP_CANARY:
        reply = admin.admin_action(user, "canary", version, lambda: admin.stop_canary(user, expected=version),
                                   detail={"via": "watch alert"})
    else:
        reply = admin.admin_action(user, "rollback", version, lambda: admin.rollback(user, expected=version),
                                   detail={"via": "watch alert"})
    _decided(reply, body, client, respond)


def _decided(reply, body: dict, client: WebClient, respond) -> None:
    """A decision taken by a button: refused or failed, only the clicker hears it; done, the
    message says who decided and loses its buttons."""
    if not reply.public:
        respond(text=reply.text, response_type="ephemeral", replace_original=False)
        return
    channel = (body.get("container") or {}).get("channel_id") or (body.get("channel") or {}).get("id")
    message = body.get("message") or {}
    kept = [b for b in message.get("blocks") or [] if b.get("type") != "actions"]
    kept.append({"type": "section", "text": mrkdwn(reply.text)})
    try:
        client.chat_update(channel=channel, ts=message.get("ts"), text=reply.text, blocks=kept)
    except SlackApiError as exc:
        log.error("cannot update the message under the button", error=exc.response.get("error"))
        respond(text=reply.text, response_type="in_channel", replace_original=False)
