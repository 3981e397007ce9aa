"""Watching a promoted version on real traffic: is it worse for the people using it than the one
it replaced? Each version's answers while it was live, and the share of them someone voted down
or corrected, with a Beta(1, 1) prior on that share; P(worse) = P(new share > old share) under
the two posteriors (Monte Carlo, seeded, so the same figures give the same verdict). Once the
new version has given FLYWHEEL_WATCH_MIN_ANSWERS answers and P(worse) ≥ FLYWHEEL_WATCH_ALERT_P,
the admin channel hears it once, with the figures and a Rollback button."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from slack_sdk.errors import SlackApiError
from slack_sdk.web import WebClient

from bot import metrics
from bot.blocks import WATCH_ROLLBACK, WATCH_STOP_CANARY, mrkdwn, plain
from bot.settings import BotSettings
from flywheel.logs import get_logger
from store.audit import list_audit, record_audit
from store.db import session_scope
from store.watch import Outcomes, live_window, version_outcomes

log = get_logger("bot.watch")
ALERT = "watch.alert"
SAMPLES = 20_000


def p_worse(new: Outcomes, old: Outcomes, samples: int = SAMPLES) -> float:
    """P(the new version's bad-answer share exceeds the old one's) under Beta(1 + bad, 1 + good)."""
    rng = np.random.default_rng(0)
    a = rng.beta(1 + new.bad, 1 + new.answers - new.bad, samples)
    b = rng.beta(1 + old.bad, 1 + old.answers - old.bad, samples)
    return float((a > b).mean())


@dataclass(frozen=True)
class Comparison:
    new: Outcomes
    old: Outcomes
    p_worse: float
    canary: bool = False


def compare() -> Comparison | None:
    """The live version against the one before it (None until production has moved)."""
    with session_scope() as s:
        window = live_window(s)
        if window is None:
            return None
        new = version_outcomes(s, window.current, window.since, None)
        old = version_outcomes(s, window.previous, window.previous_since, window.previous_until)
    return Comparison(new, old, p_worse(new, old), window.canary)


def _rates(o: Outcomes) -> str:
    if not o.answers:
        return f"`{o.version}`: no answers yet"
    pct = lambda n: f"{100 * n / o.answers:.0f} %"  # noqa: E731
    return (f"`{o.version}`: {o.answers} answers · 👍 {pct(o.up)} · 👎 {pct(o.down)} · "
            f"corrected {pct(o.corrected)} · voted down or corrected {pct(o.bad)}")


def describe(c: Comparison | None, min_answers: int) -> str:
    if c is None:
        return "No version has been promoted yet: nothing to compare."
    verdict = (f"P(`{c.new.version}` is worse) = *{c.p_worse:.2f}*" if c.new.answers >= min_answers else
               f"P(worse) = {c.p_worse:.2f} so far; judged after {min_answers} answers "
               f"({c.new.answers} until now)")
    title, labels = (("*Canary watch* (same days' traffic)", ("canary", "production")) if c.canary
                     else ("*Live version watch*", ("now", "before")))
    return f"{title}\n{labels[0]}  {_rates(c.new)}\n{labels[1]}  {_rates(c.old)}\n{verdict}"


def alert_blocks(c: Comparison, min_answers: int) -> list[dict]:
    """The figures and one button: roll production back, or during a canary stop the canary."""
    if c.canary:
        action, label, what = WATCH_STOP_CANARY, "Stop the canary", f"Production (`{c.old.version}`) answers everyone again."
    else:
        action, label, what = WATCH_ROLLBACK, "Roll back", f"Production goes back from `{c.new.version}` to `{c.old.version}`."
    return [
        {"type": "section", "text": mrkdwn(f":warning: *`{c.new.version}` looks worse for users than "
                                           f"`{c.old.version}`*\n" + describe(c, min_answers))},
        {"type": "actions", "block_id": "watch_actions", "elements": [
            {"type": "button", "action_id": action, "style": "danger", "text": plain(label), "value": c.new.version,
             "confirm": {"title": plain(f"{label}?"), "confirm": plain(label), "deny": plain("Cancel"),
                         "text": mrkdwn(what)}},
        ]},
    ]


class VersionWatch:
    def __init__(self, settings: BotSettings, client: WebClient) -> None:
        self.settings, self.client = settings, client

    def check(self) -> bool:
        """Alert once per promoted version when it is judged worse; True when it posted."""
        if not self.settings.admin_channel:
            return False
        c = compare()
        if c is None or c.new.answers < self.settings.watch_min_answers or c.p_worse < self.settings.watch_alert_p:
            return False
        with session_scope() as s:
            if list_audit(s, action=ALERT, target=c.new.version, limit=1):
                return False  # told already
        try:
            self.client.chat_postMessage(channel=self.settings.admin_channel, blocks=alert_blocks(c, self.settings.watch_min_answers),
                                         text=f"{c.new.version} looks worse for users than {c.old.version}")
        except SlackApiError as exc:
            log.error("cannot post the version watch alert", error=exc.response.get("error"))
            return False
        with session_scope() as s:
            record_audit(s, actor="flywheel", action=ALERT, target=c.new.version,
                         detail={"p_worse": round(c.p_worse, 4), "new": c.new.__dict__, "old": c.old.__dict__})
        metrics.WATCH_ALERTS.inc()
        log.warning("live version looks worse; admins told", version=c.new.version, p_worse=round(c.p_worse, 3))
        return True
