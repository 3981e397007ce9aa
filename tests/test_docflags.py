"""A correction of an answer taken from a document flags the section in the admin channel as
possibly out of date (issue 28), through the real bot: the answer records the sections it cited,
its correction is posted once to the admin channel naming the section and audited, an answer
that cited no document flags nothing, and a document imported for one channel is flagged by its
ids only, without the correction's text."""
from __future__ import annotations

import shutil
from datetime import UTC, datetime

import pytest

from flywheel.app.demo.slack_double import SlackDouble
from flywheel.memory import Memory, MemorySettings
from store.audit import list_audit
from store.db import session_scope
from store.documents import SECTION_FLAGGED, list_documents, section_key, sections_of
from tests.support.bot_harness import (
    ADMIN_CHANNEL,
    BotServer,
    store_and_gateway,
    suggest_correction,
    wait_answer,
)
from tests.test_documents import DOCS, LAPTOP_Q, load
from tests.test_memory import real_embedder_dir
from tests.test_review import stored

ALICE = "UALICE01"
GOLD = "New hires now get a 14-inch Dell Latitude 7450, collected from room 3.01."


@pytest.fixture
def memory():
    real_embedder_dir()
    return Memory(MemorySettings())


def ask(bot: BotServer, text: str, channel: str) -> str:
    ts = bot.sender.next_ts()
    bot.sender.mention(f"<@UFLYWHEEL> {text}", user=ALICE, channel=channel, ts=ts)
    return wait_answer(bot, channel, ts)[0]


def flags(bot: BotServer) -> list[str]:
    return [c.args["text"] for c in bot.double.calls_to("chat.postMessage")
            if c.args.get("channel") == ADMIN_CHANNEL and "may be out of date" in (c.args.get("text") or "")]


def test_a_correction_of_an_answer_from_a_document_flags_its_section(tiny_model_dir, tmp_path, memory):
    private_doc = tmp_path / "team-handbook.md"
    shutil.copy(DOCS / "handbook.md", private_doc)
    with store_and_gateway(tiny_model_dir, tmp_path, "docflags-test") as gateway:
        with session_scope() as s:
            load(s, memory, DOCS / "handbook.md")
            load(s, memory, private_doc, visible_in="GTEAM0001")
            (public, _n), (team, _m) = list_documents(s)
            laptops = next(row for row in sections_of(s, public.id) if row.title == "Onboarding › Laptops")
        double = SlackDouble().start()
        bot = BotServer(gateway_url=gateway.url, double=double, reports_enabled=False).start()
        try:
            plain_ts = ask(bot, "What is two plus two?", "CDOCS001")  # first: a flag would come before the next
            assert stored("CDOCS001", plain_ts).cited == []
            suggest_correction(bot, "CDOCS001", plain_ts, "Four.", ALICE)

            a_ts = ask(bot, LAPTOP_Q, "CDOCS001")
            assert section_key(laptops) in stored("CDOCS001", a_ts).cited
            suggest_correction(bot, "CDOCS001", a_ts, GOLD, ALICE)
            flag = bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == ADMIN_CHANNEL
                                       and "may be out of date" in (c.args.get("text") or ""))[-1].args["text"]

            p_ts = ask(bot, LAPTOP_Q, "GTEAM0001")
            suggest_correction(bot, "GTEAM0001", p_ts, GOLD, ALICE)
            bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == ADMIN_CHANNEL
                                and f"of document {team.id}" in (c.args.get("text") or ""))
            with session_scope() as s:
                audited = list_audit(s, action=SECTION_FLAGGED, target=f"section {laptops.id}")
        finally:
            bot.stop()
            double.stop()
    today = datetime.now(UTC)
    assert flag.startswith(f"An answer taken from *Onboarding › Laptops* (imported {today.day} {today:%b})")
    assert f"was corrected by <@{ALICE}>: the section may be out of date." in flag and GOLD in flag
    assert len(flags(bot)) == 2  # one per correction; the answer that cited no document flagged nothing
    private = flags(bot)[1]
    assert "(visible only in <#GTEAM0001>)" in private and GOLD not in private
    # both answers about laptops cited the public section (the private channel's also its own copy)
    assert [(e.actor, e.detail["document"], e.detail["section"]) for e in audited] == [
        (ALICE, public.id, "Onboarding › Laptops")] * 2
