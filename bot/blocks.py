"""Block Kit for answers and the correction modal; action ids the listeners match on."""
from __future__ import annotations

import json

from bot.slack_text import escape, escape_within

FEEDBACK_ACTION = "answer_feedback"  # Slack's feedback_buttons element: value up / down
VOTE_ACTIONS = ("vote_up", "vote_down")  # classic buttons, same meaning
SUGGEST_ACTION = "suggest_correction"
CORRECTION_VIEW = "correction_modal"
CORRECTION_BLOCK, CORRECTION_INPUT = "correction", "text"
SHORTCUT_INCLUDE = "add_to_training"
SHORTCUT_GOLDEN = "mark_golden"
REPORT_APPROVE, REPORT_REJECT = "report_approve", "report_reject"
REVIEW_APPROVE, REVIEW_EDIT, REVIEW_REJECT = "review_approve", "review_edit", "review_reject"
REVIEW_EDIT_VIEW = "review_edit_modal"
WATCH_ROLLBACK, WATCH_STOP_CANARY = "watch_rollback", "watch_stop_canary"  # under a version-watch alert

SOURCE_MARK = ":bookmark:"  # opens the line under an answer that says what it is based on
SECTION_LIMIT = 2900  # Slack allows 3000 characters per section text
THINKING = "_Thinking…_"


def plain(text: str) -> dict:
    return {"type": "plain_text", "text": text, "emoji": True}


def mrkdwn(text: str) -> dict:
    return {"type": "mrkdwn", "text": text}


MAX_SECTIONS = 40  # with the answer's other blocks, well inside Slack's 50 a message


def sections(text: str) -> list[dict]:
    """Long (escaped) text split into sections Slack accepts: at line breaks where possible, never
    inside an entity; past MAX_SECTIONS the rest is cut and the cut says so."""
    out, rest = [], text or " "
    while rest and len(out) < MAX_SECTIONS:
        cut = len(rest)
        if cut > SECTION_LIMIT:
            cut = rest.rfind("\n", 0, SECTION_LIMIT) + 1 or SECTION_LIMIT
            amp = rest.rfind("&", 0, cut)
            if amp > 0 and ";" not in rest[amp:cut]:
                cut = amp
        out.append({"type": "section", "text": mrkdwn(rest[:cut])})
        rest = rest[cut:]
    if rest:
        out[-1]["text"]["text"] += "\n_… (cut: longer than a Slack message holds)_"
    return out


def feedback_block(style: str) -> dict:
    if style == "feedback_buttons":
        return {"type": "context_actions", "block_id": "feedback", "elements": [{
            "type": "feedback_buttons", "action_id": FEEDBACK_ACTION,
            "positive_button": {"text": plain("👍"), "value": "up",
                                "accessibility_label": "Mark this answer as helpful"},
            "negative_button": {"text": plain("👎"), "value": "down",
                                "accessibility_label": "Mark this answer as unhelpful"},
        }]}
    return {"type": "actions", "block_id": "feedback", "elements": [
        {"type": "button", "action_id": VOTE_ACTIONS[0], "text": plain("👍"), "value": "up"},
        {"type": "button", "action_id": VOTE_ACTIONS[1], "text": plain("👎"), "value": "down"},
    ]}


def answer_blocks(text: str, *, model_version: str | None, latency_ms: float, style: str,
                  source: str | None = None) -> list[dict]:
    """The answer, what it was based on, who produced it, feedback buttons and the correction button."""
    served = f"model `{model_version or 'unknown'}` · {latency_ms / 1000:.1f} s"
    return [
        *sections(escape(text)),
        *([{"type": "context", "elements": [mrkdwn(f"{SOURCE_MARK} {source}")]}] if source else []),
        {"type": "context", "elements": [mrkdwn(served)]},
        feedback_block(style),
        {"type": "actions", "block_id": "answer_actions", "elements": [
            {"type": "button", "action_id": SUGGEST_ACTION, "text": plain("Suggest a better answer"),
             "value": "suggest"},
        ]},
    ]


def streaming_blocks(text_so_far: str) -> list[dict]:
    return [*sections(escape(text_so_far) + " ▌"), {"type": "context", "elements": [mrkdwn("_writing…_")]}]


def correction_modal(*, channel: str, ts: str, question: str | None, answer: str) -> dict:
    """"Suggest a better answer": the question and answer for reference, one text input."""
    blocks = []
    if question:
        blocks.append({"type": "section", "text": mrkdwn(f"*Question*\n{_excerpt(question)}")})
    blocks += [
        {"type": "section", "text": mrkdwn(f"*Answer given*\n{_excerpt(answer)}")},
        {"type": "input", "block_id": CORRECTION_BLOCK, "label": plain("A better answer"),
         "element": {"type": "plain_text_input", "action_id": CORRECTION_INPUT, "multiline": True,
                     "max_length": 3000, "placeholder": plain("What should the bot have said?")}},
    ]
    return {"type": "modal", "callback_id": CORRECTION_VIEW, "title": plain("Suggest a better answer"),
            "submit": plain("Save"), "close": plain("Cancel"),
            "private_metadata": json.dumps({"channel": channel, "ts": ts}), "blocks": blocks}


def _excerpt(text: str | None, n: int = 600) -> str:
    return escape_within(text or "", n)


def review_item_blocks(*, feedback_id: int, author: str, where: str, question: str | None, answer: str,
                       suggestion: str | None, what: str = "Correction") -> list[dict]:
    """One item waiting for review: `what` it is (a correction, a 👍, an "Add to training data")
    and whose, what was asked, what the bot said, the suggested answer (corrections only; None
    otherwise), and Approve / Edit / Reject (the value is the item's feedback id)."""
    value = str(feedback_id)
    shown = [
        {"type": "section", "text": mrkdwn(f"*{what} by <@{author}>* {where}")},
        {"type": "section", "text": mrkdwn(f"*Question*\n{_excerpt(question) or '_(not found)_'}")},
        {"type": "section", "text": mrkdwn(f"*Bot's answer*\n{_excerpt(answer)}")},
    ]
    if suggestion is not None:
        shown.append({"type": "section", "text": mrkdwn(f"*Suggested answer*\n{_excerpt(suggestion, 2000)}")})
    return [*shown, {"type": "actions", "block_id": f"review_{value}", "elements": [
        {"type": "button", "action_id": REVIEW_APPROVE, "text": plain("Approve"), "style": "primary",
         "value": value},
        {"type": "button", "action_id": REVIEW_EDIT, "text": plain("Edit"), "value": value},
        {"type": "button", "action_id": REVIEW_REJECT, "text": plain("Reject"), "style": "danger",
         "value": value},
    ]}]


def review_edit_modal(*, feedback_id: int, suggestion: str, reply_to: dict) -> dict:
    """Edit a suggested answer before approving it; `reply_to` says which message to update."""
    return {"type": "modal", "callback_id": REVIEW_EDIT_VIEW, "title": plain("Edit and approve"),
            "submit": plain("Approve"), "close": plain("Cancel"),
            "private_metadata": json.dumps({"feedback_id": feedback_id, **reply_to}),
            "blocks": [{"type": "input", "block_id": CORRECTION_BLOCK, "label": plain("The answer to teach"),
                        "element": {"type": "plain_text_input", "action_id": CORRECTION_INPUT,
                                    "multiline": True, "max_length": 3000,
                                    "initial_value": suggestion[:3000]}}]}


def modal_text(view: dict) -> str:
    """The text typed into a correction or review modal (its one input), stripped."""
    value = (((view.get("state") or {}).get("values") or {}).get(CORRECTION_BLOCK) or {}).get(CORRECTION_INPUT) or {}
    return (value.get("value") or "").strip()


def modal_metadata(view: dict) -> dict:
    """The private metadata a modal was opened with ({} when missing or not JSON)."""
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except json.JSONDecodeError:
        return {}
    return meta if isinstance(meta, dict) else {}
