"""What Slack would refuse: the Slack double runs every message, modal and App Home view through
slack_sdk's Block Kit models (their validators hold Slack's documented limits: 3000 characters a
section, 2000 a button value, 24 a modal title, 100 blocks a view, …) plus the message-level
limits the models do not know (50 blocks, 40,000 characters of text). So a test fails on a
payload Slack would answer with `invalid_blocks`, not only in production."""
from __future__ import annotations

from typing import Any

from slack_sdk.errors import SlackObjectFormationError
from slack_sdk.models.blocks import Block
from slack_sdk.models.views import View

MESSAGE_MAX_BLOCKS = 50  # chat.postMessage / chat.update / responses
MESSAGE_MAX_TEXT = 40_000  # longer text is refused as msg_too_long


def _block_errors(blocks: Any, where: str) -> list[str]:
    if blocks in (None, ""):
        return []
    if not isinstance(blocks, list):
        return [f"{where}: blocks must be a list"]
    errors = []
    for i, raw in enumerate(blocks):
        if not isinstance(raw, dict) or "type" not in raw:
            errors.append(f"{where}: block {i} has no type")
            continue
        block = Block.parse(raw)
        if block is None or type(block) is Block:
            errors.append(f"{where}: block {i} has an unknown type {raw.get('type')!r}")
            continue
        try:
            block.to_dict()  # runs the validators of the block and everything inside it
        except SlackObjectFormationError as exc:
            errors.append(f"{where}: block {i} ({raw['type']}): {exc}")
    return errors


def message_errors(args: dict) -> list[str]:
    """Errors in a message payload (postMessage, postEphemeral, update, response_url)."""
    errors = []
    blocks = args.get("blocks")
    if isinstance(blocks, list) and len(blocks) > MESSAGE_MAX_BLOCKS:
        errors.append(f"message: {len(blocks)} blocks (Slack allows {MESSAGE_MAX_BLOCKS})")
    if len(str(args.get("text") or "")) > MESSAGE_MAX_TEXT:
        errors.append(f"message: text over {MESSAGE_MAX_TEXT} characters")
    return errors + _block_errors(blocks, "message")


def view_errors(view: Any) -> list[str]:
    """Errors in a modal or App Home view (views.open / push / update / publish)."""
    if not isinstance(view, dict):
        return ["view must be an object"]
    try:
        View(**view).to_dict()
    except (SlackObjectFormationError, TypeError) as exc:
        return [f"view ({view.get('type')}): {exc}"] + _block_errors(view.get("blocks"), "view")
    return _block_errors(view.get("blocks"), "view")
