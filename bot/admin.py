"""The `/flywheel` command and the report buttons: status for everyone, changes for admins.
Every admin action checks FLYWHEEL_ADMINS and leaves an audit event, refusals and errors too."""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from bot import metrics
from bot.blocks import sections
from bot.canary import Canary
from bot.gateway_client import GatewayClient
from bot.settings import BotSettings
from bot.slack_text import escape_within
from bot.watch import compare, describe
from flywheel.logs import get_logger
from store.audit import add_audit, record_audit
from store.channels import set_training_share, shared_channels
from store.db import session_scope
from store.documents import list_documents, remove_document
from store.errors import NotFoundError, StoreError
from store.forget import Forgotten, forget_user
from store.memory import (
    deactivate_memory_item,
    deactivate_memory_items,
    list_memory_items,
    memory_item_by_id,
    memory_taught_since,
)
from store.models import VersionStatus
from store.overview import overview
from store.replicas import list_replicas
from store.runs import queue_run
from store.versions import (
    ALIASES,
    CANDIDATE,
    PRODUCTION,
    VERSION_NAME,
    alias_history,
    alias_target,
    count_versions,
    find_version,
    list_versions,
    move_alias,
    promote_version,
    rollback_target,
    set_version_status,
    version_label,
    went_live_at,
)

log = get_logger("bot.admin")

HELP = """*`/flywheel` commands*
• `help`: this text
• `status`: production version, last runs, data counts
• `versions [page]`: model versions and their gate verdicts, 30 a page
• `history`: which version was live when
• `watch`: the live version against the one before it, on real answers (👍, 👎, corrections)
• `review`: corrections waiting for review _(admins and reviewers)_
• `train`: queue a training run _(admin)_
• `approve <version>` / `promote <version> [--force "reason"]`: put a version in production _(admin; gate-passed versions only unless forced)_
• `reject <version>`: reject a candidate _(admin)_
• `rollback`: put the previous production version back _(admin)_
• `canary <version>` / `canary stop`: let a version answer FLYWHEEL_CANARY_PERCENT of people before promoting it _(admin)_
• `share #channel` / `unshare #channel` / `share`: let a private channel's teaching train the model everyone uses, take it back, list such channels _(admin)_
• `forget @user`: remove a person's messages, feedback and memory items from the store _(admin)_
• `memory [search TEXT]` / `memory remove ID` / `memory retire VERSION`: list or search the memory items answers use, switch one off, or all taught since a version went live (a rollback offers it) _(admin)_
• `docs` / `docs remove ID`: the imported documents answers cite (`flywheel docs import` adds them), remove one _(admin)_"""

VERSIONS_PER_PAGE = 30
ADMIN_COMMANDS = {"train", "approve", "promote", "reject", "rollback", "canary", "share", "unshare", "forget",
                  "memory", "docs"}
CHANNEL_REF = re.compile(r"^<#([CG][A-Z0-9]{2,})(?:\|[^>]*)?>$|^([CG][A-Z0-9]{2,})$")
USER_REF = re.compile(r"^<@([UW][A-Z0-9]{2,})(?:\|[^>]*)?>$|^([UW][A-Z0-9]{2,})$")
MEMORY_LISTED = 20


@dataclass
class Reply:
    text: str
    public: bool = False  # announce a change in the channel; otherwise only the caller sees it
    blocks: list | None = None  # Block Kit when the reply has buttons (text is then the fallback)


class CommandError(ValueError):
    """The command text could not be understood."""


def parse(text: str) -> tuple[str, list[str], str | None]:
    """`approve ft-0002 --force "looks fine"` → ("approve", ["ft-0002"], "looks fine")."""
    try:
        words = shlex.split(text or "")
    except ValueError as exc:
        raise CommandError(f"cannot read the command ({exc}); check the quotes") from exc
    if not words:
        return "help", [], None
    force = None
    if "--force" in words:
        at = words.index("--force")
        if at + 1 >= len(words) or not words[at + 1].strip() or words[at + 1].startswith("--"):
            raise CommandError('--force needs a reason: --force "why this version must go live"')
        force = words[at + 1].strip()
        words = words[:at] + words[at + 2:]
    return words[0].lower(), words[1:], force


def _bar(progress: float, width: int = 10) -> str:
    filled = max(0, min(width, round(progress * width)))
    return "▓" * filled + "░" * (width - filled)


def run_line(run) -> str:
    if run.status == "running":
        state = f"running {_bar(run.progress)} {run.progress:.0%} (step {run.step}/{run.total_steps})"
    else:
        state = run.status
    extra = f" → `{run.model_version}`" if run.model_version else ""
    return f"#{run.id} {state}{extra}"


class Admin:
    def __init__(self, settings: BotSettings, gateway: GatewayClient, *, review, canary: Canary) -> None:
        """`review`: the bot's bot.review.Review, None where there is no review queue (the CLI)."""
        self.settings, self.gateway, self.review, self.canary = settings, gateway, review, canary

    # -- entry points ----------------------------------------------------------------------------
    def run_command(self, user: str, text: str) -> Reply:
        try:
            name, args, force = parse(text)
        except CommandError as exc:
            return Reply(f":x: {exc}\n\n{HELP}")
        if name in ADMIN_COMMANDS:
            target = args[0] if args else name if name in ("memory", "docs") else PRODUCTION
            return self.admin_action(user, name, target, lambda: self._dispatch(user, name, args, force),
                                     detail={"command": text})
        handler = {"help": lambda: Reply(HELP), "status": self.status, "versions": lambda: self.versions(*args[:1]),
                   "history": self.history, "watch": self.watch}.get(name)
        if name == "review" and self.review is not None:
            return self.review.pending_reply(user)
        if handler is None:
            return Reply(f":x: unknown command `{name}`\n\n{HELP}")
        return handler()

    def admin_action(self, user: str, action: str, target: str, do, detail: dict | None = None) -> Reply:
        """Check the caller is an admin, run `do`, audit refusals and failures (successful
        changes audit themselves inside the store's transaction)."""
        if not self.settings.is_admin(user):
            with session_scope() as s:
                record_audit(s, actor=user, action=f"command.{action}", target=target, outcome="refused",
                             detail={**(detail or {}), "reason": "not an admin"})
            metrics.ADMIN.labels(action, "refused").inc()
            log.warning("admin command refused", user=user, action=action, target=_loggable(target))
            return Reply(f":no_entry: Only Flywheel admins can `{action}`. This attempt was logged.")
        try:
            reply = do()
        except (StoreError, ValueError) as exc:
            log.warning("admin command failed", user=user, action=action, target=_loggable(target),
                        error=type(exc).__name__,
                        exc_info=not isinstance(exc, StoreError))
            with session_scope() as s:
                record_audit(s, actor=user, action=f"command.{action}", target=target, outcome="error",
                             detail={**(detail or {}), "error": str(exc)})
            metrics.ADMIN.labels(action, "error").inc()
            return Reply(f":x: {exc}")
        except Exception as exc:  # the database or the gateway failed: audit if we can, say so plainly
            log.error("admin command crashed", user=user, action=action, target=_loggable(target),
                      error=type(exc).__name__)
            try:
                with session_scope() as s:
                    record_audit(s, actor=user, action=f"command.{action}", target=target, outcome="error",
                                 detail={**(detail or {}), "error": type(exc).__name__})
            except Exception as audit_exc:
                log.error("cannot audit the failure", error=type(audit_exc).__name__)
            metrics.ADMIN.labels(action, "error").inc()
            return Reply(f":x: `{action}` failed on our side ({type(exc).__name__}); nothing was changed "
                         "unless a later message says so. Try again in a moment.")
        metrics.ADMIN.labels(action, "ok").inc()
        return reply

    def _dispatch(self, user: str, name: str, args: list[str], force: str | None) -> Reply:
        if name in ("share", "unshare"):
            return self.share(user, args, shared=name == "share")
        if name == "train":
            return self.train(user)
        if name == "forget":
            return self.forget(user, args)
        if name == "memory":
            return self.memory(user, args)
        if name == "docs":
            return self.docs(user, args)
        if name == "rollback":
            return self.rollback(user)
        if name == "canary":
            if args == ["stop"]:
                return self.stop_canary(user)
            if len(args) != 1:
                raise ValueError("usage: /flywheel canary <version> | canary stop")
            return self.start_canary(user, args[0])
        if len(args) != 1:
            raise ValueError(f"usage: /flywheel {name} <version>" + (' [--force "reason"]' if name != "reject" else ""))
        if name == "reject":
            return self.reject(user, args[0])
        return self.approve(user, args[0], force)

    # -- changes (admins only; callers go through admin_action) ----------------------------------
    def train(self, user: str) -> Reply:
        with session_scope() as s:
            run = queue_run(s, queued_by=user)
            record_audit(s, actor=user, action="run.queue", target=f"run {run.id}")
        return Reply(f":gear: <@{user}> queued training run #{run.id}. Progress will show in "
                     f"{'<#' + self.settings.admin_channel + '>' if self.settings.admin_channel else 'the admin channel'}.",
                     public=True)

    def share(self, user: str, args: list[str], *, shared: bool) -> Reply:
        """Opt a non-public channel into training the shared model (or take it back); no channel:
        the list. What was taught there stays out of the shared model until an admin says so."""
        if not args and shared:
            with session_scope() as s:
                rows = shared_channels(s)
            listed = ", ".join(f"<#{c.id}> (by <@{c.shared_by}>)" for c in rows) or "none"
            return Reply(f"Private channels whose teaching trains the model everyone uses: {listed}.")
        found = CHANNEL_REF.match(args[0]) if len(args) == 1 else None
        if found is None:
            raise ValueError(f"usage: /flywheel {'share' if shared else 'unshare'} #channel (a channel, not a DM)")
        channel = found.group(1) or found.group(2)
        with session_scope() as s:
            set_training_share(s, channel, shared=shared, by=user)
            record_audit(s, actor=user, action="channel.share" if shared else "channel.unshare", target=channel)
        if shared:
            return Reply(f":unlock: <@{user}> let what is taught in <#{channel}> train the model everyone uses, "
                         "from the next training run on. `/flywheel unshare` takes it back.", public=True)
        return Reply(f":lock: <@{user}> took <#{channel}> out of training: from the next run on, what is taught "
                     "there stays there. Versions trained before keep what they learned: train again to drop it.", public=True)

    def forget(self, user: str, args: list[str]) -> Reply:
        """`/flywheel forget @user`: everything the person said or taught leaves the store (audited
        with the counts, and the versions already trained on it named)."""
        found = USER_REF.match(args[0]) if len(args) == 1 else None
        if found is None:
            raise ValueError("usage: /flywheel forget @user")
        person = found.group(1) or found.group(2)
        with session_scope() as s:
            gone = forget_user(s, person, actor=user)
        log.info("user forgotten", by=user, user=person, **{k: v for k, v in gone.detail().items()
                                                            if isinstance(v, int)})
        return Reply(f":wastebasket: Forgot <@{person}>: {forgotten_summary(gone)}")

    def memory(self, user: str, args: list[str]) -> Reply:
        """`/flywheel memory [search TEXT] | remove ID | retire VERSION`: the items answers are taught from."""
        if args[:1] == ["remove"]:
            if len(args) != 2 or not args[1].lstrip("#").isdigit():
                raise ValueError("usage: /flywheel memory remove ID (the number `/flywheel memory` shows)")
            return self.remove_memory_item(user, int(args[1].lstrip("#")))
        if args[:1] == ["retire"]:
            if len(args) != 2:
                raise ValueError("usage: /flywheel memory retire VERSION (a version that was in production)")
            return self.retire_memory_since(user, args[1])
        if args[:1] == ["search"] and len(args) < 2:
            raise ValueError("usage: /flywheel memory search TEXT")
        if args and args[0] != "search":
            raise ValueError("usage: /flywheel memory [search TEXT] | memory remove ID | memory retire VERSION")
        search = " ".join(args[1:]) or None
        with session_scope() as s:
            items = list_memory_items(s, search=search, limit=MEMORY_LISTED)
        if not items:
            return Reply(f"No memory item contains “{escape_within(search, 100)}”." if search
                         else "The memory is empty: nobody has taught an answer yet.")
        head = (f"*Memory items containing “{escape_within(search, 100)}”*" if search else "*Memory items*")
        lines = [f"{head} (newest first, at most {MEMORY_LISTED}; `/flywheel memory remove ID` switches one off)"]
        lines += [memory_line(item) for item in items]
        text = "\n".join(lines)
        return Reply(text[:3000], blocks=sections(text))

    def remove_memory_item(self, user: str, item_id: int) -> Reply:
        with session_scope() as s:
            item = memory_item_by_id(s, item_id)
            if item is None or not item.active:
                raise NotFoundError(f"no active memory item {item_id} (`/flywheel memory` lists them)")
            add_audit(s, actor=user, action="memory.remove", target=f"memory {item_id}",
                      detail={"key": item.key, "source": item.source, "author": item.author})
            deactivate_memory_item(s, item.key)  # commits the audit event with it
        return Reply(f":wastebasket: <@{user}> removed memory item {item_id}: answers no longer use it. "
                     "Training still uses what it came from (the correction or import stays).")

    def retire_memory_since(self, user: str, version: str) -> Reply:
        """After a rollback, offered, not forced: switch off the memory items taught while
        `version` was live (they may be what made it look worse); what they came from stays."""
        with session_scope() as s:
            since = went_live_at(s, version)
            if since is None:
                raise NotFoundError(f"`{version}` was never in production (`/flywheel history` shows what was)")
            items = memory_taught_since(s, since)
            add_audit(s, actor=user, action="memory.retire", target=f"since {version}",
                      detail={"since": since.isoformat(), "items": [i.id for i in items]})
            deactivate_memory_items(s, [item.key for item in items])
            s.commit()
        return Reply(f":wastebasket: <@{user}> switched off {len(items)} memory item(s) taught since `{version}` "
                     f"went live: answers no longer use them. The corrections they came from stay.", public=True)

    def docs(self, user: str, args: list[str]) -> Reply:
        """`/flywheel docs [remove ID]`: the imported documents whose sections answers cite."""
        if args[:1] == ["remove"]:
            if len(args) != 2 or not args[1].lstrip("#").isdigit():
                raise ValueError("usage: /flywheel docs remove ID (the number `/flywheel docs` shows)")
            with session_scope() as s:
                doc = remove_document(s, int(args[1].lstrip("#")))
                record_audit(s, actor=user, action="docs.remove", target=f"document {doc.id}",
                             detail={"source": doc.source, "title": doc.title})
            return Reply(f":wastebasket: <@{user}> removed document {doc.id}, _{escape_within(doc.title, 150)}_: "
                         "answers no longer cite it.", public=True)
        if args:
            raise ValueError("usage: /flywheel docs | docs remove ID")
        with session_scope() as s:
            rows = list_documents(s)
        if not rows:
            return Reply("No documents imported yet: `flywheel docs import PATH|URL` on the server adds them.")
        lines = ["*Imported documents* (`/flywheel docs remove ID` removes one)"]
        lines += [document_line(doc, n) for doc, n in rows]
        text = "\n".join(lines)
        return Reply(text[:3000], blocks=sections(text))

    def approve(self, user: str, version: str, force: str | None = None) -> Reply:
        """Approve and promote: the production alias moves (audited in the same transaction),
        then the gateway is asked to swap now."""
        with session_scope() as s:
            moved = promote_version(s, version, actor=user, reason=force, force=force is not None)
            if alias_target(s, CANDIDATE) == version:  # a canary that made it: everyone gets it now
                move_alias(s, CANDIDATE, None, actor=user, reason="promoted")
        self.canary.forget()
        sync = self.gateway.request_sync()
        forced = f' (forced: "{force}")' if force else ""
        log.info("promoted", version=version, previous=moved["from"], by=user, forced=bool(force))
        return Reply(f":rocket: <@{user}> promoted `{version}` to production{forced}; "
                     f"previously `{moved['from'] or 'base model'}`. {sync}. {self._live(version)}", public=True)

    def start_canary(self, user: str, version: str) -> Reply:
        """Open a gate-passed version to the canary share (approved, on the candidate alias)."""
        if self.settings.canary_percent <= 0:
            raise ValueError("canaries are off in this deployment (FLYWHEEL_CANARY_PERCENT=0)")
        with session_scope() as s:
            current = find_version(s, version)
            if current is None:
                raise ValueError(f"no version `{version}`")
            if current.status == VersionStatus.candidate:
                set_version_status(s, version, VersionStatus.approved, actor=user, commit=False)
            elif current.status != VersionStatus.approved:
                raise ValueError(f"`{version}` is {current.status}; only gate-passed candidates can be a canary")
            move_alias(s, CANDIDATE, version, actor=user, reason="canary")
        self.canary.forget()
        return Reply(f":hatching_chick: <@{user}> started a canary: `{version}` now answers "
                     f"{self.settings.canary_percent:g} % of people (the same people each time). "
                     "`/flywheel watch` compares it with production; `/flywheel approve` promotes it, "
                     "`/flywheel canary stop` ends it.", public=True)

    def stop_canary(self, user: str, expected: str | None = None) -> Reply:
        """`expected`: stop only if that version is still the canary (a button under an old alert
        must not stop a canary started since), compared under the alias lock (move_alias)."""
        with session_scope() as s:
            if expected is None and alias_target(s, CANDIDATE) is None:
                raise ValueError("no canary is running")
            version = move_alias(s, CANDIDATE, None, actor=user, reason="canary stopped", expected=expected)["from"]
        self.canary.forget()
        return Reply(f":octagonal_sign: <@{user}> stopped the canary of `{version}`: production answers everyone.",
                     public=True)

    def reject(self, user: str, version: str) -> Reply:
        with session_scope() as s:
            set_version_status(s, version, VersionStatus.rejected, actor=user)
        return Reply(f":no_entry_sign: <@{user}> rejected `{version}`.", public=True)

    def rollback(self, user: str, expected: str | None = None) -> Reply:
        """`expected`: roll back only if that version is still live (a button under an old alert
        must not roll back a version promoted since), compared under the alias lock (move_alias)."""
        with session_scope() as s:
            target = rollback_target(s)
            version = find_version(s, target) if target else None
            force = version is not None and not version.gate_passed
            moved = move_alias(s, PRODUCTION, target, actor=user, reason="rollback", force=force, expected=expected)
            offer = _retire_offer(s, moved["from"])
        sync = self.gateway.request_sync()
        return Reply(f":rewind: <@{user}> rolled production back from `{moved['from'] or 'base model'}` "
                     f"to `{target or 'base model'}`. {sync}. {self._live(target)}{offer}", public=True)

    # -- read-only -------------------------------------------------------------------------------
    def watch(self) -> Reply:
        return Reply(describe(compare(), self.settings.watch_min_answers))

    def _live(self, version: str | None) -> str:
        """Best effort: the change is committed already, so a failed read here must not turn the
        reply into "nothing was changed"."""
        try:
            with session_scope() as s:
                replicas = list_replicas(s)
        except Exception as exc:
            log.warning("cannot read the replicas", error=type(exc).__name__)
            return "(`/flywheel status` shows where it is live.)"
        if not replicas:
            return ""
        label = version_label(version)  # what replicas report for the base model
        live = sum(1 for r in replicas if (r.served or {}).get(PRODUCTION) == label)
        return f"Live on {live}/{len(replicas)} gateway replicas."

    def status(self) -> Reply:
        with session_scope() as s:
            o = overview(s, runs=3)
        prod, runs, feedback, examples = o.production, o.runs, o.feedback, o.examples
        questions, answers = o.questions, o.answers
        votes = sum(feedback.values())
        lines = [f"*Production:* `{prod or 'base model'}`. {self._live(prod)}",
                 "*Last runs:* " + ("; ".join(run_line(r) for r in runs) if runs else "none yet"),
                 (f"*Data:* {questions} questions, {answers} answers, {votes} feedback "
                  f"({feedback_summary(feedback)}), {examples_summary(examples)}")]
        return Reply("\n".join(lines))

    def versions(self, page: str = "1") -> Reply:
        """Newest first, VERSIONS_PER_PAGE at a time, each with its gate verdict and the first
        reason a failed gate gave; long lists are split into sections Slack accepts."""
        if not page.isdigit() or int(page) < 1:
            return Reply(f":x: `versions {escape_within(page, 20)}`: the page is a number from 1")
        offset = (int(page) - 1) * VERSIONS_PER_PAGE
        with session_scope() as s:
            prod = alias_target(s, PRODUCTION)  # first: it expires the session's objects
            versions = list_versions(s, limit=VERSIONS_PER_PAGE, offset=offset)
            total = count_versions(s)
        if not total:
            return Reply("No model versions yet: production serves the base model.")
        if not versions:
            return Reply(f"There are {total} model versions: page {page} is past the last one.")
        lines = [f"*Model versions* {offset + 1}–{offset + len(versions)} of {total} (newest first)"]
        for v in versions:
            gate = "gate passed" if v.gate_passed else "gate failed"
            why = f" ({escape_within(v.gate_reasons[0], 160)})" if not v.gate_passed and v.gate_reasons else ""
            star = " ← *production*" if v.name == prod else ""
            lines.append(f"• `{v.name}` {v.status}, {gate}{why}, {v.created_at:%Y-%m-%d %H:%M}{star}")
        if offset + len(versions) < total:
            lines.append(f"_Older ones: `/flywheel versions {int(page) + 1}`_")
        text = "\n".join(lines)
        return Reply(text[:3000], blocks=sections(text))

    def history(self) -> Reply:
        with session_scope() as s:
            moves = alias_history(s, PRODUCTION, limit=10)
        if not moves:
            return Reply("Production has always served the base model.")
        lines = ["*Production history* (newest first)"]
        for m in moves:
            why = f' ("{m["reason"]}")' if m.get("reason") else ""
            lines.append(f"• {m['at']:%Y-%m-%d %H:%M} <@{m['actor']}>: `{m['from'] or 'base'}` → "
                         f"`{m['to'] or 'base'}`{why}")
        return Reply("\n".join(lines))


def _loggable(target: str) -> str:
    """A version name or an alias as typed, anything else not at all: logs hold no typed text
    (the audit row, which admins read, keeps it)."""
    return target if VERSION_NAME.fullmatch(target or "") or target in ALIASES else "(not a version name)"


def forgotten_summary(gone: Forgotten) -> str:
    """What a forgetting removed, and which versions already learned it."""
    text = (f"{gone.messages} messages, {gone.answers} answers to them, {gone.feedback} feedback, "
            f"{gone.examples} examples and {gone.memory_items} memory items removed.")
    if gone.versions:
        named = ", ".join(f"`{v}`" for v in gone.versions)
        text += (f" Already trained on it: {named} (and snapshots {', '.join(map(str, gone.snapshots))} with "
                 "their exports): train again and promote the new version to drop it.")
    return text


def memory_line(item) -> str:
    """One memory item as `/flywheel memory` lists it."""
    where = ("everywhere" if item.visible_in is None
             else "in a DM" if item.visible_in.startswith("D") else f"only in <#{item.visible_in}>")
    who = f" by <@{item.author}>" if item.author else ""
    return (f"• `{item.id}` _{escape_within(item.question, 150)}_ → {escape_within(item.answer, 200)} "
            f"({item.source}{who}, {where}, {item.created_at:%Y-%m-%d})")


def _retire_offer(session, rolled_back: str | None) -> str:
    """What a rollback offers: the memory items taught while the rolled-back version was live."""
    since = went_live_at(session, rolled_back) if rolled_back else None
    taught = len(memory_taught_since(session, since)) if since else 0
    if not taught:
        return ""
    return (f"\n{taught} memory item(s) were taught while `{rolled_back}` was live; "
            f"`/flywheel memory retire {rolled_back}` switches them off if they are part of the problem.")


def document_line(doc, sections: int) -> str:
    """One imported document as `/flywheel docs` lists it."""
    where = "everywhere" if doc.visible_in is None else f"only in <#{doc.visible_in}>"
    return (f"• `{doc.id}` *{escape_within(doc.title, 150)}*: {sections} sections, v{doc.version}, {where}, "
            f"updated {doc.updated_at:%Y-%m-%d} ({escape_within(doc.source, 200)})")


def examples_summary(counts: dict[str, int]) -> str:
    """count_examples' {"import": 3, "rejected": 2, "golden": 1, "total": 5, ...} → "3 examples (1
    golden), 2 voted-down answers": the voted-down answers nobody corrected are no training target
    (only KTO uses them), so they are not counted as examples."""
    rejected = counts.get("rejected", 0)
    text = f"{counts.get('total', 0) - rejected} examples ({counts.get('golden', 0)} golden)"
    return text + (f", {rejected} voted-down answers kept for preference training" if rejected else "")


def feedback_summary(counts: dict[str, int]) -> str:
    """{"reaction:up": 2, "button:up": 1, "label:unclear": 1, ...} → "👍 3, 👎 0, 1 labels, …"."""
    def total(kinds, value=None):
        return sum(n for k, n in counts.items()
                   if k.split(":", 1)[0] in kinds and (value is None or k.split(":", 1)[1] == value))

    return (f"👍 {total(('reaction', 'button'), 'up')}, 👎 {total(('reaction', 'button'), 'down')}, "
            f"{total(('correction',))} corrections, {total(('label',))} labels, "
            f"{total(('golden',))} golden, {total(('shortcut',))} added by shortcut")
