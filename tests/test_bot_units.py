"""Bot pieces that need no servers: Slack escaping, settings, command parsing,
reaction meanings, report tables, the Slack double's printing mode."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.admin import CommandError, examples_summary, feedback_summary, parse
from bot.blocks import SECTION_LIMIT, answer_blocks, sections
from bot.channels import ChannelVisibility
from bot.feedback import Feedback
from bot.reports import metrics_table
from bot.settings import BotSettings
from bot.slack_text import escape
from flywheel.prompt import PromptSettings

BOT = "UBOT0001"


def test_slack_escaping():
    assert escape("a < b & c > d") == "a &lt; b &amp; c &gt; d"


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-1")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "s")
    monkeypatch.setenv("SLACK_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("FLYWHEEL_ADMINS", "U1, U2")
    monkeypatch.setenv("FLYWHEEL_UP_EMOJIS", ":rocket:,+1")
    monkeypatch.setenv("FLYWHEEL_LABEL_EMOJIS", "bug=bug-report,:dart:=on-topic")
    s = BotSettings()
    assert (s.slack_bot_token, s.api_base_url) == ("xoxb-1", "http://127.0.0.1:9/api/")
    assert s.admins == ["U1", "U2"] and s.is_admin("U2") and not s.is_admin("U3") and not s.is_admin(None)
    assert s.up_emojis == ["rocket", "+1"] and s.label_emojis == {"bug": "bug-report", "dart": "on-topic"}
    s.require_http_credentials()


@pytest.mark.parametrize("env, message", [
    ({"FLYWHEEL_LABEL_EMOJIS": "bug"}, "emoji=label"),
    ({"FLYWHEEL_UP_EMOJIS": "+1", "FLYWHEEL_DOWN_EMOJIS": "+1"}, "mapped twice"),
    ({"FLYWHEEL_GATEWAY_URL": "localhost:8000"}, "must start with http"),
    ({"FLYWHEEL_FEEDBACK_STYLE": "stars"}, "feedback_buttons or buttons"),
])
def test_bad_settings_are_named(monkeypatch, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        BotSettings()


def test_missing_credentials_are_named(monkeypatch):
    for key in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ValueError, match="SLACK_BOT_TOKEN, SLACK_SIGNING_SECRET"):
        BotSettings().require_http_credentials()


def test_command_parsing():
    assert parse("") == ("help", [], None)
    assert parse("Approve ft-0002") == ("approve", ["ft-0002"], None)
    assert parse('promote ft-0002 --force "eval set too small"') == ("promote", ["ft-0002"], "eval set too small")
    for bad in ("approve ft-0002 --force", 'approve ft-0002 --force ""', 'approve "ft-0002'):
        with pytest.raises(CommandError):
            parse(bad)


def test_reaction_meanings_follow_the_settings():
    fb = Feedback(BotSettings(up_emojis=["+1"], down_emojis=["-1"], label_emojis={"bug": "bug-report"}), None,
                  ChannelVisibility(), PromptSettings())
    assert fb.reaction_meaning("+1::skin-tone-4") == ("reaction", "up")
    assert fb.reaction_meaning("-1") == ("reaction", "down")
    assert fb.reaction_meaning("bug") == ("label", "bug-report")
    assert fb.reaction_meaning("tada") is None


def test_default_label_emojis_are_the_documented_ones(monkeypatch):
    """README: `:question:`→unclear, `:warning:`→unsafe, `:zzz:`→off-topic by default."""
    for key in ("FLYWHEEL_LABEL_EMOJIS", "FLYWHEEL_UP_EMOJIS", "FLYWHEEL_DOWN_EMOJIS"):
        monkeypatch.delenv(key, raising=False)
    fb = Feedback(BotSettings(), None, ChannelVisibility(), PromptSettings())
    assert [fb.reaction_meaning(e) for e in ("question", "warning", ":zzz:", "warning::skin-tone-2")] == [
        ("label", "unclear"), ("label", "unsafe"), ("label", "off-topic"), ("label", "unsafe")]
    assert fb.reaction_meaning("bug") is None


def test_blocks_split_long_answers_and_carry_the_version():
    long = ("line of text\n" * 600)
    parts = sections(long)
    assert len(parts) > 1 and all(len(p["text"]["text"]) <= SECTION_LIMIT for p in parts)
    assert "".join(p["text"]["text"] for p in parts) == long
    shown = answer_blocks("a < b", model_version="ft-0007", latency_ms=1234, style="buttons")
    assert shown[0]["text"]["text"] == "a &lt; b" and "ft-0007" in shown[1]["elements"][0]["text"]
    assert [e["action_id"] for e in shown[2]["elements"]] == ["vote_up", "vote_down"]


def test_voted_down_answers_are_not_counted_as_examples():
    assert examples_summary({"import": 3, "correction": 2, "golden": 1, "total": 5}) == "5 examples (1 golden)"
    assert examples_summary({"import": 3, "rejected": 2, "golden": 1, "total": 5}) == (
        "3 examples (1 golden), 2 voted-down answers kept for preference training")
    assert examples_summary({}) == "0 examples (0 golden)"


def test_metrics_table_and_feedback_summary():
    table = metrics_table({"candidate": {"token_f1": 0.7123, "n": 20}, "base": {"token_f1": 0.17},
                           "production": {"token_f1": 0.5}, "notes": "x"})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "candidate", "production", "base"]
    assert lines[1].split() == ["token_f1", "0.712", "0.500", "0.170"] and lines[2].split() == ["n", "20", "–", "–"]
    assert metrics_table({}) == ""
    summary = feedback_summary({"reaction:up": 2, "button:up": 1, "button:down": 1, "label:bug": 3,
                                "correction:correction": 1})
    assert summary.startswith("👍 3, 👎 1, 1 corrections, 3 labels")


def test_slack_double_printing_mode_shows_what_the_bot_posts():
    from slack_sdk import WebClient

    from flywheel.app.demo.slack_double import SlackDouble

    lines: list[str] = []
    with SlackDouble(printer=lines.append) as slack:
        client = WebClient(token=slack.bot_token, base_url=slack.api_url)
        posted = client.chat_postMessage(channel="C1", text="fallback",
                                         blocks=answer_blocks("Paris.", model_version="ft-0001", latency_ms=300,
                                                              style="feedback_buttons"))
        client.chat_update(channel="C1", ts=posted["ts"], text="Lyon.")
        with pytest.raises(Exception, match="invalid_auth"):
            WebClient(token="xoxb-wrong", base_url=slack.api_url).auth_test()
        assert slack.message("C1", posted["ts"])["text"] == "Lyon."
    out = "\n".join(lines)
    assert "chat.postMessage C1" in out and "Paris." in out and "[👍] [👎]\n    [Suggest a better answer]" in out
    assert "chat.update C1:\n    Lyon." in out



def test_report_blocks_for_each_stage_of_a_run():
    import json

    from bot.reports import report_blocks
    from store.models import ModelVersion, TrainingRun

    running = TrainingRun(id=7, status="running", progress=0.5, step=5, total_steps=10, queued_by="U1",
                          metrics=[{"step": 5, "loss": 0.8123}])
    text = json.dumps(report_blocks(running, None, final=False), ensure_ascii=False)
    assert "Training run #7" in text and "50%" in text and "loss 0.8123" in text and "<@U1>" in text
    failed = TrainingRun(id=8, status="failed", error="CUDA out of memory")
    assert "CUDA out of memory" in json.dumps(report_blocks(failed, None, final=True))
    rejected = ModelVersion(name="ft-0009", adapter_path="a", adapter_sha256="0" * 64, base_model="m",
                            gate_passed=False, gate_reasons=["golden pass rate 0.50 < 1.00"], status="rejected",
                            report={"candidate": {"f1": 0.4}, "production": {"f1": 0.5}})
    shown = report_blocks(TrainingRun(id=9, status="succeeded", model_version="ft-0009"), rejected, final=True)
    text = json.dumps(shown)
    assert "Gate failed" in text and "golden pass rate" in text and "report_approve" not in text
    assert "--force" in text and not any(b["type"] == "actions" for b in shown)
    passed = rejected.model_copy(update={"gate_passed": True, "status": "candidate", "gate_reasons": []})
    buttons = report_blocks(TrainingRun(id=9, status="succeeded"), passed, final=True)[-1]["elements"]
    assert [b["action_id"] for b in buttons] == ["report_approve", "report_reject"]
    assert buttons[0]["value"] == "ft-0009" and "confirm" in buttons[0]


def test_socket_mode_needs_no_signing_secret_and_serves_no_events_endpoint(monkeypatch):
    from bot.server import create_asgi
    from flywheel.app.demo.slack_double import SlackDouble

    with SlackDouble() as slack:
        settings = BotSettings(slack_bot_token=slack.bot_token, slack_app_token="xapp-1", slack_signing_secret=None,
                               slack_api_url=slack.api_url, reports_enabled=False)
        asgi = create_asgi(settings, socket_mode=True)
        assert {r.path for r in asgi.routes} == {"/healthz", "/metrics"}
        with pytest.raises(ValueError, match="SLACK_SIGNING_SECRET"):
            create_asgi(settings, socket_mode=False)


def test_cli_names_missing_settings(monkeypatch):
    from typer.testing import CliRunner

    from bot.commands import bot_app

    for key in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(bot_app, ["serve", "--port", "0"])
    assert result.exit_code == 2 and "SLACK_BOT_TOKEN" in result.output
    manifest = CliRunner().invoke(bot_app, ["manifest"])
    import yaml

    spec = yaml.safe_load(manifest.output)
    assert spec["features"]["slash_commands"][0]["command"] == "/flywheel"
    assert {"app_mention", "reaction_added", "reaction_removed", "message.im", "assistant_thread_started"} <= set(
        spec["settings"]["event_subscriptions"]["bot_events"])
    assert "agent_view" in spec["features"] and "assistant:write" in spec["oauth_config"]["scopes"]["bot"]
    assert "assistant_view" not in spec["features"]  # agent_view replaces it (one of the two per app)
    assert spec["features"]["agent_view"]["agent_description"]
    assert {s["callback_id"] for s in spec["features"]["shortcuts"]} == {"add_to_training", "mark_golden"}


def test_run_progress_as_a_plan_and_the_fallback_where_plan_blocks_are_refused():
    from slack_sdk.errors import SlackApiError

    from bot.reports import ReportPoller, progress_plan, report_blocks
    from bot.settings import BotSettings
    from store.models import RunStatus, TrainingRun

    run = TrainingRun(id=7, status=RunStatus.running, step=40, total_steps=40, dataset_snapshot_id=3)
    states = {t["task_id"]: t["status"] for t in progress_plan(run, 0.25)["tasks"]}
    assert states == {"dataset": "complete", "train": "complete", "evaluate": "in_progress", "register": "pending"}
    queued = TrainingRun(id=8, status=RunStatus.queued)
    assert {t["status"] for t in progress_plan(queued, None)["tasks"]} == {"pending"}
    assert not any(b["type"] == "plan" for b in report_blocks(run, None, False, plan=False))

    class Workspace:  # refuses plan blocks as a workspace without them does
        def __init__(self):
            self.posted = []

        def chat_postMessage(self, channel, text, blocks):
            if any(b["type"] == "plan" for b in blocks):
                raise SlackApiError("invalid_blocks", {"ok": False, "error": "invalid_blocks"})
            self.posted.append(blocks)
            return {"ts": "1.1"}

    client = Workspace()
    poller = ReportPoller(BotSettings(slack_bot_token="xoxb-x", admin_channel="CADMIN"), client)
    with pytest.MonkeyPatch.context() as mp:  # no store needed: the message's ts is not kept
        mp.setattr("bot.reports.session_scope", _null_scope)
        mp.setattr("bot.reports.set_report_message", lambda *args, **kwargs: True)
        assert poller._show(run, None) == 1
    assert len(client.posted) == 1 and not any(b["type"] == "plan" for b in client.posted[0])
    assert poller._plans is False  # and it is not tried again in this process


class _null_scope:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("signature", ["v0=é" + "a" * 62, "v0=\u2603", "\udcff"])
def test_a_non_ascii_signature_is_a_bad_signature_not_a_crash(signature):
    """Issue 25.7: hmac.compare_digest raised TypeError on it (a 500 and a traceback in front and worker)."""
    import time

    from slack_sdk.signature import SignatureVerifier

    from bot.slack_http import Rejected, check_signature

    headers = {"x-slack-request-timestamp": str(int(time.time())), "x-slack-signature": signature}
    with pytest.raises(Rejected) as refused:
        check_signature(SignatureVerifier("secret"), b'{"type": "event_callback"}', headers)
    assert refused.value.status == 401
