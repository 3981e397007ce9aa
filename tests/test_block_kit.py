"""Block Kit that Slack accepts whatever the text: every builder fed hostile input (huge, all
`&<>` so escaping grows it fivefold) stays inside Slack's limits, checked by slack_sdk's models in
flywheel.app.demo.block_kit; and the Slack double refuses what Slack would refuse."""
from __future__ import annotations

import html

import pytest
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import blocks
from bot.reports import report_blocks
from bot.slack_text import escape_within
from flywheel.app.demo.block_kit import message_errors, view_errors
from flywheel.app.demo.slack_double import SlackDouble
from store.models import ModelVersion, RunStatus, TrainingRun

HOSTILE = ("Fish & chips <b>bold</b> > all\n" * 4000)  # ~124k characters, ~40 % of them escaped


@pytest.mark.parametrize("text, limit", [("a" * 10, 5), ("&&&&&&", 12), ("ab&cd", 4), ("<" * 3000, 2000), ("", 3)])
def test_escape_within_fits_after_escaping_and_never_splits_an_entity(text, limit):
    out = escape_within(text, limit)
    assert len(out) <= limit
    body = out.removesuffix("…")
    assert html.unescape(body) == text[:len(html.unescape(body))]  # a clean prefix: no half "&am"
    assert out == body or len(html.escape(text, quote=False)) > limit


def test_a_huge_answer_is_split_into_valid_sections_and_the_cut_is_said():
    for built in (blocks.answer_blocks(HOSTILE, model_version="v7", latency_ms=900, style="feedback_buttons",
                                       source="a correction by <@U1>"),
                  blocks.answer_blocks(HOSTILE, model_version=None, latency_ms=1, style="buttons"),
                  blocks.streaming_blocks(HOSTILE)):
        assert message_errors({"text": HOSTILE[:3000], "blocks": built}) == []
        shown = "".join(b["text"]["text"] for b in built if b["type"] == "section")
        assert "longer than a Slack message holds" in shown
    short = blocks.answer_blocks("Payday is the 25th & the 10th.", model_version="v1", latency_ms=5,
                                 style="feedback_buttons")
    assert short[0]["text"]["text"] == "Payday is the 25th &amp; the 10th."


def test_modals_and_review_requests_stay_valid_with_hostile_text():
    long = HOSTILE[:20000]
    assert view_errors(blocks.correction_modal(channel="C1", ts="1.2", question=long, answer=long)) == []
    assert view_errors(blocks.review_edit_modal(feedback_id=7, suggestion=long,
                                                reply_to={"channel": "C1", "ts": "1.2"})) == []
    item = blocks.review_item_blocks(feedback_id=7, author="U1", where="in <#C1>", question=long, answer=long,
                                     suggestion=long)
    assert message_errors({"text": "review", "blocks": item}) == []


def test_training_reports_stay_valid_with_a_huge_error_or_many_gate_reasons():
    run = TrainingRun(id=3, status=RunStatus.failed, error=HOSTILE, queued_by="UADMIN01", total_steps=60)
    assert message_errors({"text": "report", "blocks": report_blocks(run, None, final=True)}) == []
    run = TrainingRun(id=4, status=RunStatus.succeeded, total_steps=60)
    version = ModelVersion(name="v4", adapter_path="/x", adapter_sha256="0" * 64, base_model="m & <base>",
                           gate_passed=False, gate_reasons=[f"reason {i}: {HOSTILE[:200]}" for i in range(100)],
                           report={})
    assert message_errors({"text": "report", "blocks": report_blocks(run, version, final=True)}) == []


def test_the_double_refuses_what_slack_would_refuse():
    with SlackDouble() as slack:
        client = WebClient(token=slack.bot_token, base_url=slack.api_url)
        client.chat_postMessage(channel="C1", text="fine", blocks=[{"type": "divider"}])
        with pytest.raises(SlackApiError) as too_many:
            client.chat_postMessage(channel="C1", text="x", blocks=[{"type": "divider"}] * 51)
        with pytest.raises(SlackApiError) as too_long:
            client.chat_postMessage(channel="C1", text="x", blocks=[
                {"type": "section", "text": {"type": "mrkdwn", "text": "a" * 3001}}])
        with pytest.raises(SlackApiError) as bad_title:
            client.views_publish(user_id="U1", view={"type": "modal", "title": {"type": "plain_text", "text": "x" * 25},
                                                     "blocks": [{"type": "divider"}]})
        assert {e.value.response["error"] for e in (too_many, too_long, bad_title)} == {"invalid_blocks"}
        assert [method for method, _ in slack.refused] == ["chat.postMessage", "chat.postMessage", "views.publish"]
        assert "3000" in slack.refused[1][1][0] and "24" in slack.refused[2][1][0]
