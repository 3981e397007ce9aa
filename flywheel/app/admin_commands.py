"""`flywheel versions | promote | rollback | review`: the admin's commands without Slack.

promote and rollback run the bot's own admin actions (bot.admin.Admin.approve / rollback, through
Admin.admin_action), so they are checked, audited and announced to the gateway exactly as
`/flywheel promote` and `/flywheel rollback` are: the store functions write the version.approve
and alias.move events in the change's own transaction, and a refusal or a failure leaves a
`command.<action>` event with outcome `error`. The actor is `cli:<login>` (or `--as NAME`): the
CLI's authority is access to the database (FLYWHEEL_DATABASE_URL), not a Slack user id. The
gateway is asked to swap at once when FLYWHEEL_GATEWAY_URL and FLYWHEEL_GATEWAY_ADMIN_TOKEN are
set (the bot's pod has both); otherwise replicas follow at their next poll. `review approve|reject`
decides through the bot's own review (bot.review.Review.decide), so the memory learns an approved
correction and its author hears of the decision in Slack, as after a click: it needs the bot's
SLACK_BOT_TOKEN (the bot's pod has it)."""
from __future__ import annotations

import json
import re
import shlex
from typing import Annotated

import typer

from store.audit import cli_actor
from store.db import session_scope
from store.review import count_pending, pending_reviews, subject
from store.versions import CANDIDATE, PRODUCTION, alias_target, count_versions, list_versions

ACTOR_HELP = "Who the audit log names (default: cli:<login>)"


def _plain(text: str) -> str:
    """The bot's Slack reply as terminal text: mentions as names, no leading emoji code."""
    text = re.sub(r"<@([^>|]+)(?:\|[^>]*)?>", r"\1", text)
    return re.sub(r"^:[a-z0-9_+-]+: ", "", text)


def _run_admin_action(actor: str, action: str, target: str, command: list[str], do) -> None:
    """Run one of the bot's admin actions as `actor`, audited as the Slack command is; exit 1
    (after the audit) when it was refused or failed."""
    # the bot's admin side (Slack SDK, Bolt's helpers) adds ~0.7-1.2 s to every `flywheel` command: only here
    from bot.admin import Admin  # Slack SDK, Bolt helpers (~0.7-1.2 s with the three below)
    from bot.canary import Canary  # bot package: as above
    from bot.gateway_client import GatewayClient  # httpx + bot package: as above
    from bot.settings import BotSettings  # bot package: as above

    settings = BotSettings().model_copy(update={"admins": [actor]})
    gateway = GatewayClient(settings)
    admin = Admin(settings, gateway, review=None, canary=Canary(settings))
    done = {}

    def attempt():
        reply = do(admin)
        done["ok"] = True
        return reply

    try:
        reply = admin.admin_action(actor, action, target, attempt,
                                   detail={"command": shlex.join(command), "via": "cli"})
    finally:
        gateway.close()
    if not done:
        typer.secho(_plain(reply.text), fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(_plain(reply.text))


def promote(
    version: Annotated[str, typer.Argument(help="The version to put in production, e.g. ft-0007")],
    force: Annotated[str | None, typer.Option(
        "--force", help="Promote a version the gate rejected; the reason goes to the audit log")] = None,
    actor: Annotated[str | None, typer.Option("--as", help=ACTOR_HELP)] = None,
) -> None:
    """Approve and promote a version (as `/flywheel promote`): the production alias moves, audited."""
    who = cli_actor(actor)
    command = ["promote", version] + (["--force", force] if force is not None else [])
    _run_admin_action(who, "promote", version, command, lambda admin: admin.approve(who, version, force))


def rollback(
    expect: Annotated[str | None, typer.Option(
        "--expect", help="Roll back only if this version is live now (else nothing changes)")] = None,
    actor: Annotated[str | None, typer.Option("--as", help=ACTOR_HELP)] = None,
) -> None:
    """Put the previous production version back (as `/flywheel rollback`), audited."""
    who = cli_actor(actor)
    command = ["rollback"] + (["--expect", expect] if expect else [])
    _run_admin_action(who, "rollback", PRODUCTION, command, lambda admin: admin.rollback(who, expect))


def versions(
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first")] = 30,
    page: Annotated[int, typer.Option(min=1, help="Which page of --limit versions")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per version")] = False,
) -> None:
    """List model versions, newest first: status, gate verdict, which one is in production."""
    with session_scope() as s:
        prod, canary = alias_target(s, PRODUCTION), alias_target(s, CANDIDATE)  # first: they expire the session
        rows = list_versions(s, limit=limit, offset=(page - 1) * limit)
        total = count_versions(s)
        items = [{"name": v.name, "status": str(v.status), "gate_passed": v.gate_passed,
                  "gate_reasons": list(v.gate_reasons or []), "base_model": v.base_model,
                  "created_at": v.created_at.isoformat(timespec="seconds"),
                  "production": v.name == prod, "canary": v.name == canary} for v in rows]
    if as_json:
        for item in items:
            typer.echo(json.dumps(item))
        return
    if not total:
        typer.echo("No model versions yet: production serves the base model.")
        return
    typer.echo(f"production: {prod or 'base model'}" + (f"; canary: {canary}" if canary else ""))
    typer.echo(f"{'version':<12} {'status':<10} {'gate':<7} {'created (UTC)':<17} note")
    for item in items:
        gate = "passed" if item["gate_passed"] else "failed"
        note = "← production" if item["production"] else "← canary" if item["canary"] else ""
        if not item["gate_passed"] and item["gate_reasons"]:
            note = (note + " " if note else "") + item["gate_reasons"][0][:80]
        typer.echo(f"{item['name']:<12} {item['status']:<10} {gate:<7} {item['created_at'][:16].replace('T', ' '):<17} {note}".rstrip())
    shown = (page - 1) * limit + len(items)
    if shown < total:
        typer.echo(f"({shown} of {total}; older ones: --page {page + 1})")


review_app = typer.Typer(help="The review queue (corrections, 👍 and 'Add to training data' waiting), as /flywheel review", no_args_is_help=False)


@review_app.callback(invoke_without_command=True)
def review_list(ctx: typer.Context,
                limit: Annotated[int, typer.Option(min=1, help="How many, oldest first")] = 20) -> None:
    """List what waits for review, oldest first: the id to approve or reject, what it is, by whom."""
    if ctx.invoked_subcommand is not None:
        return
    with session_scope() as s:
        waiting = count_pending(s)
        items = [(row.id, subject(row), row.user, msg.text, row.correction) for row, msg in pending_reviews(s, limit=limit)]
    if not items:
        typer.echo("Nothing waits for review.")
        return
    typer.echo(f"{waiting} item(s) wait for review" + (f" (the oldest {limit} below)" if waiting > limit else ""))
    for item_id, kind, user, answer, suggestion in items:
        line = f"{item_id}\t{kind}\tby {user}\tanswer: {' '.join((answer or '').split())[:80]}"
        typer.echo(line + (f"\tsuggested: {' '.join(suggestion.split())[:80]}" if suggestion else ""))


def _decide(feedback_id: int, actor: str | None, *, approve: bool, text: str | None) -> None:
    """Decide as a click on Approve / Reject (or an edit) does: audited, the memory taught, the
    author told in Slack; exit 1 when it was refused or failed."""
    # the bot's review side: seconds to import, only here
    from bot.app import make_web_client  # Bolt, Slack SDK
    from bot.channels import ChannelVisibility  # Slack SDK
    from bot.feedback import Feedback  # Slack SDK, the memory
    from bot.review import Review  # Slack SDK
    from bot.settings import BotSettings  # bot package (pydantic settings): with the above
    from flywheel.memory import Memory, MemorySettings  # numpy, pgvector, the store's memory queries
    from flywheel.prompt import PromptSettings  # with the memory: the prompt module

    who = cli_actor(actor)
    settings = BotSettings().model_copy(update={"admins": [who]})
    if not settings.slack_bot_token:
        typer.secho("review decisions need SLACK_BOT_TOKEN (the author is told in Slack, as after a click); "
                    "run this where the bot runs", fg="red", err=True)
        raise typer.Exit(2)
    feedback = Feedback(settings, Memory(MemorySettings()), ChannelVisibility(settings.channel_visibility_ttl_s),
                        PromptSettings())
    decided, said, follow_up = Review(settings, feedback).decide(
        make_web_client(settings), who, feedback_id, approve=approve, text=text)
    if not decided:
        typer.secho(_plain(said), fg="red", err=True)
        raise typer.Exit(1)
    follow_up()
    typer.echo(_plain(said))


@review_app.command("approve")
def review_approve(
    feedback_id: Annotated[int, typer.Argument(help="The id `flywheel review` lists")],
    text: Annotated[str | None, typer.Option("--text", help="Approve with this text instead (an edit)")] = None,
    actor: Annotated[str | None, typer.Option("--as", help=ACTOR_HELP)] = None,
) -> None:
    """Approve an item (optionally edited): it teaches the memory and the next training run."""
    _decide(feedback_id, actor, approve=True, text=text)


@review_app.command("reject")
def review_reject(
    feedback_id: Annotated[int, typer.Argument(help="The id `flywheel review` lists")],
    actor: Annotated[str | None, typer.Option("--as", help=ACTOR_HELP)] = None,
) -> None:
    """Reject an item: it teaches nothing."""
    _decide(feedback_id, actor, approve=False, text=None)
