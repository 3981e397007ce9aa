"""Documents as a source (issue 28): each parser on a small fixture (tests/data/docs/), re-import
after editing one section, removal, visibility, URLs (a local http.server, private addresses
refused unless allowed), redaction before storing, and an answer through the real bot that cites
the section it was given."""
from __future__ import annotations

import http.server
import json
import shutil
import threading
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import httpx
import pytest

from flywheel.app.demo.slack_double import SlackDouble
from flywheel.memory import Memory, MemoryPlan, MemorySettings, Recalled, citation, plan
from flywheel.prompt import with_notes
from store.db import session_scope
from store.documents import (
    list_documents,
    remove_document,
    section_key,
    sections_of,
)
from store.memory import memory_items_by_key
from store.models import SECTION_SOURCE
from tests.support.bot_harness import ADMIN_USER, BotServer, command_reply, store_and_gateway, wait_answer
from tests.test_memory import memory_db_url, real_embedder_dir, stores  # noqa: F401 (a fixture)
from trainer.docparse import parse
from trainer.docsource import (
    DocumentError,
    DocumentSettings,
    Source,
    check_url,
    collect,
    fetch,
    read_path,
)
from trainer.documents import chunks, import_document

DOCS = Path(__file__).parent / "data" / "docs"
SETTINGS = DocumentSettings()
LAPTOP_Q = "Which laptop will I get as a new hire?"


@pytest.fixture(scope="module")
def embedder():
    real_embedder_dir()
    return Memory(MemorySettings()).embedder


@pytest.fixture
def memory(embedder):
    """A memory of its own per test (its in-process index belongs to one database), one embedder."""
    return Memory(MemorySettings(), embedder=embedder)


def parsed(name: str):
    return parse(read_path(DOCS / name, SETTINGS)[0])


def doc_notes(found: MemoryPlan) -> list[str]:
    return [n.question for n in found.notes if n.source == SECTION_SOURCE]


def load(session, memory, path: Path, **kw):
    return import_document(session, memory, read_path(path, SETTINGS)[0],
                           section_chars=SETTINGS.docs_section_chars, **kw)


# -- parsers -----------------------------------------------------------------------------------
def test_markdown_splits_by_its_headings_and_keeps_the_title_path():
    doc = parsed("handbook.md")
    assert doc.title == "Onboarding"
    titles = [t for t, _ in doc.sections]
    assert titles == ["Onboarding", "Onboarding › Laptops", "Onboarding › Badges",
                      "Onboarding › Badges › Lost badges", "Onboarding › Help"]
    laptops = dict(doc.sections)["Onboarding › Laptops"]
    assert "ThinkPad X1 Carbon" in laptops and "- Charger and dock are included." in laptops
    assert "Lost badges" not in dict(doc.sections)["Onboarding › Badges"]


def test_html_splits_by_its_headings_without_scripts_styles_or_navigation():
    doc = parsed("travel.html")
    assert doc.title == "Travel policy"
    sections = dict(doc.sections)
    assert list(sections) == ["Travel policy", "Travel policy › Trains", "Travel policy › Flights"]
    assert "second class" in sections["Travel policy › Trains"]
    assert "Rail cards are refunded.\nSeat reservations too." in sections["Travel policy › Trains"]
    assert "team lead & finance" in sections["Travel policy › Flights"]  # entities decoded
    everything = json.dumps(doc.sections)
    assert "console.log" not in everything and "Wiki" not in everything and "color" not in everything


def test_plain_text_is_one_section_under_the_file_name():
    doc = parsed("parking.txt")
    assert [t for t, _ in doc.sections] == ["parking"]
    assert "forty spaces.\n\nSpaces are first come" in doc.sections[0][1]


def test_pdf_pages_become_sections_under_its_title():
    doc = parsed("expenses.pdf")
    assert doc.title == "Expenses"
    assert doc.sections == [("Expenses › page 1", "Expense claims are filed within 30 days of the purchase."),
                            ("Expenses › page 2", "Receipts over 50 euros need the original paper copy.")]


def test_long_sections_are_cut_at_paragraphs_within_the_limit():
    paragraphs = [f"Paragraph {i} " + "word " * 40 for i in range(6)]
    pieces = chunks("\n\n".join(paragraphs), 500)
    assert len(pieces) > 1 and all(len(p) <= 500 for p in pieces)
    assert "".join(pieces).replace("\n", "").replace(" ", "") == "".join(paragraphs).replace(" ", "")
    assert all(len(p) <= 300 for p in chunks("x" * 900, 300))


def test_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(DocumentError, match="no such file"):
        read_path(tmp_path / "missing.md", SETTINGS)
    (tmp_path / "slides.pptx").write_bytes(b"PK")
    with pytest.raises(DocumentError, match="unsupported file type .pptx"):
        read_path(tmp_path / "slides.pptx", SETTINGS)
    (tmp_path / "empty.md").write_text("")
    with pytest.raises(DocumentError, match="empty file"):
        read_path(tmp_path / "empty.md", SETTINGS)
    with pytest.raises(DocumentError, match="over FLYWHEEL_DOCS_MAX_BYTES"):
        read_path(DOCS / "handbook.md", DocumentSettings(docs_max_bytes=100))
    (tmp_path / "headings.md").write_text("# Only\n\n## Headings\n")
    with pytest.raises(DocumentError, match="no text"):
        parse(read_path(tmp_path / "headings.md", SETTINGS)[0])
    with pytest.raises(DocumentError, match="not a readable PDF"):
        parse(Source("broken.pdf", "broken", "pdf", b"%PDF-1.4 nothing else"))
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "a.docx").write_bytes(b"x")
    with pytest.raises(DocumentError, match="no Markdown, HTML, text or PDF"):
        read_path(tmp_path / "none", SETTINGS)


def test_a_folder_is_read_recursively(tmp_path):
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(DOCS / "parking.txt", tmp_path / "docs" / "nested.txt")
    (tmp_path / "docs" / "deeper").mkdir()
    shutil.move(tmp_path / "docs" / "nested.txt", tmp_path / "docs" / "deeper" / "nested.txt")
    kinds = sorted(s.kind for s in read_path(tmp_path / "docs", SETTINGS))
    assert kinds == ["html", "markdown", "pdf", "text", "text"]


# -- URLs --------------------------------------------------------------------------------------
@pytest.fixture
def served():
    """tests/data/docs over HTTP on 127.0.0.1 (with a redirect), for the length of a test."""
    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/handbook.md")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(DOCS)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_url_to_a_private_address_is_refused(served):
    with httpx.Client() as client:
        for url in (f"{served}/handbook.md", "http://localhost/handbook.md", "http://10.1.2.3/x.md",
                    "http://169.254.169.254/latest/meta-data", "http://[::1]/x.md", "http://[::ffff:127.0.0.1]/x"):
            with pytest.raises(DocumentError, match="private, loopback or link-local"):
                fetch(url, SETTINGS, client)
    for url in ("file:///etc/passwd", "ftp://example.com/x.md", "http:///nohost"):
        with pytest.raises(DocumentError, match="only http and https"):
            check_url(url, allow_private=True)


def test_urls_are_fetched_once_with_limits_when_private_addresses_are_allowed(served):
    allowed = DocumentSettings(docs_allow_private=True)
    with httpx.Client() as client:
        handbook, page = collect([f"{served}/moved", f"{served}/travel.html"], allowed, client)
        assert handbook.source == f"{served}/moved" and handbook.kind == "markdown"
        assert handbook.data == (DOCS / "handbook.md").read_bytes()
        assert page.kind == "html" and parse(page).title == "Travel policy"
        with pytest.raises(DocumentError, match="over FLYWHEEL_DOCS_MAX_BYTES"):
            fetch(f"{served}/handbook.md", DocumentSettings(docs_allow_private=True, docs_max_bytes=50), client)
        with pytest.raises(DocumentError, match="HTTP 404"):
            fetch(f"{served}/missing.md", allowed, client)


# -- the store and the memory ------------------------------------------------------------------
def test_reimport_after_editing_one_section_changes_only_its_items(db_url, memory, tmp_path):
    path = tmp_path / "handbook.md"
    shutil.copy(DOCS / "handbook.md", path)
    with session_scope() as s:
        first = load(s, memory, path)
        assert (first.new, first.changed, first.retired) == (5, 0, 0)
        before = {row.anchor: (row.id, section_key(row)) for row in sections_of(s, first.document.id)}
        items = {i.key: (i.id, i.updated_at) for i in memory_items_by_key(s, [k for _, k in before.values()])}
    text = path.read_text().replace("14-inch ThinkPad X1 Carbon", "16-inch MacBook Pro")
    path.write_text(text.replace("## Help\n\nWrite to it-help@lumenfold.example or call +49 30 1234567 for "
                                 "anything IT.\n", ""))
    with session_scope() as s:
        again = load(s, memory, path)
        assert (again.unchanged, again.changed, again.new, again.retired) == (3, 1, 0, 1)
        assert again.document.version == 2
        rows = {row.anchor: row for row in sections_of(s, again.document.id)}
        assert {a: r.id for a, r in rows.items()} == {a: i for a, (i, _) in before.items()}  # ids stable
        laptops = rows["Onboarding › Laptops#0"]
        assert laptops.version == 2 and "MacBook Pro" in laptops.text and not rows["Onboarding › Help#0"].active
        now = {i.key: i for i in memory_items_by_key(s, [k for _, k in before.values()] + [section_key(laptops)])}
        changed_keys = {before["Onboarding › Laptops#0"][1], before["Onboarding › Help#0"][1]}
        for key, (item_id, updated_at) in items.items():
            if key in changed_keys:
                assert not now[key].active
            else:
                assert now[key].active and (now[key].id, now[key].updated_at) == (item_id, updated_at)
        assert now[section_key(laptops)].active and "MacBook Pro" in now[section_key(laptops)].answer
        found = memory.plan_for(LAPTOP_Q, channel="CANY", session=s)
        assert "Onboarding › Laptops" in doc_notes(found)
        assert any("MacBook Pro" in n.answer for n in found.notes)
        assert not any("ThinkPad" in n.answer for n in found.notes)
        unchanged = load(s, memory, path)
        assert (unchanged.unchanged, unchanged.changed, unchanged.new, unchanged.retired) == (4, 0, 0, 0)
        assert unchanged.document.version == 2


@stores  # each search: in process (SQLite, PostgreSQL) and pgvector's in the database
@pytest.mark.usefixtures("memory_db_url")
def test_a_removed_document_stops_answering(memory):
    with session_scope() as s:
        done = load(s, memory, DOCS / "handbook.md")
        assert "Onboarding › Laptops" in doc_notes(memory.plan_for(LAPTOP_Q, channel="CANY", session=s))
        assert memory.plan_for("What is the capital of France?", channel="CANY", session=s).used == []
        assert [doc.id for doc, n in list_documents(s)] == [done.document.id]
        remove_document(s, done.document.id)
        assert doc_notes(memory.plan_for(LAPTOP_Q, channel="CANY", session=s)) == []
        assert list_documents(s) == []
        assert not any(i.active for i in memory_items_by_key(
            s, [section_key(r) for r in sections_of(s, done.document.id)]))


@stores
@pytest.mark.usefixtures("memory_db_url")
def test_an_import_for_a_channel_answers_only_there(memory):
    with session_scope() as s:
        load(s, memory, DOCS / "handbook.md", visible_in="CTEAM001")
        assert "Onboarding › Laptops" in doc_notes(memory.plan_for(LAPTOP_Q, channel="CTEAM001", session=s))
        assert doc_notes(memory.plan_for(LAPTOP_Q, channel="COTHER01", session=s)) == []


def test_redaction_runs_before_anything_is_stored(db_url, memory):
    with session_scope() as s:
        done = load(s, memory, DOCS / "handbook.md")
        assert done.redactions["EMAIL"] == 1 and done.redactions["PHONE"] == 1
        help_row = next(r for r in sections_of(s, done.document.id) if r.title == "Onboarding › Help")
        item = memory_items_by_key(s, [section_key(help_row)])[0]
        for text in (help_row.text, item.answer):
            assert "it-help@lumenfold.example" not in text and "1234567" not in text
            assert "[EMAIL]" in text and "[PHONE]" in text


def test_a_section_is_a_note_never_the_answer_itself_and_is_cited():
    when = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    section = Recalled(1, "Onboarding › Laptops", "Every new hire gets a ThinkPad.", SECTION_SOURCE, None, when, 0.95)
    taught = Recalled(2, "lunch?", "At noon.", "correction", "UALICE01", when, 0.40)
    found = plan([section, taught], MemorySettings())
    assert found.direct is None and found.notes == [section, taught]
    assert citation(found) == "Based on a correction by <@UALICE01>, 2 Dec; From *Onboarding › Laptops*, imported 2 Dec"
    assert citation(MemoryPlan(notes=[section])) == "From *Onboarding › Laptops*, imported 2 Dec"
    prompt = found.apply([{"role": "user", "content": "Which laptop?"}])
    system = prompt[0]["content"]
    assert "- From the document section “Onboarding › Laptops”:\n  Every new hire gets a ThinkPad." in system
    assert "- Q: lunch?\n  A: At noon." in system
    assert with_notes(prompt[1:], [], []) == prompt[1:]


# -- through the real bot ----------------------------------------------------------------------
def test_an_answer_through_the_bot_cites_the_section(tiny_model_dir, tmp_path, memory):
    with store_and_gateway(tiny_model_dir, tmp_path, "docs-test") as gateway:
        with session_scope() as s:
            load(s, memory, DOCS / "handbook.md")
        double = SlackDouble().start()
        bot = BotServer(gateway_url=gateway.url, double=double, reports_enabled=False).start()
        try:
            ts = bot.sender.next_ts()
            bot.sender.mention(f"<@UFLYWHEEL> {LAPTOP_Q}", user=ADMIN_USER, channel="CDOCS001", ts=ts)
            _answer_ts, final = wait_answer(bot, "CDOCS001", ts)
            listed = command_reply(bot, "docs")  # admins see and remove imports from Slack too
            assert "*Imported documents*" in listed and "Onboarding" in listed and "everywhere" in listed
            assert "Only Flywheel admins" in command_reply(bot, "docs", user="UBOB0001")
            with session_scope() as s:
                (doc, _n), = list_documents(s)
            assert f"removed document {doc.id}" in command_reply(bot, f"docs remove {doc.id}")
            assert "no imported document" in command_reply(bot, f"docs remove {doc.id}")
            assert "No documents imported yet" in command_reply(bot, "docs")
        finally:
            bot.stop()
            double.stop()
    shown = json.dumps(final.args["blocks"], ensure_ascii=False)
    today = datetime.now(UTC)
    assert f"From *Onboarding › Laptops*, imported {today.day} {today:%b}" in shown
