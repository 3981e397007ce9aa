"""Documents become training data, reviewed (issue 28): questions generated from a document's
sections through the gateway (a fake one answering fixed replies per section), filtered, reviewed
one by one or a whole document at once, and what a re-import or a removal does to them."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from bot import docreview
from flywheel.app.cli import app
from store.audit import list_audit
from store.db import session_scope
from store.docquestions import (
    add_questions,
    approve_document,
    current_questions,
    decide_question,
    memory_item,
    pending_questions,
    question_key,
    question_report,
    sections_to_ask,
)
from store.documents import list_documents, remove_document, sections_of
from store.errors import InvalidStateError
from store.memory import memory_items_by_key
from store.models import DocQuestion, DocQuestionState, Example, ExampleStatus
from tests.support.bot_harness import ADMIN_CHANNEL, BotServer
from tests.support.fake_gateway import FakeGateway
from tests.test_documents import embedder, memory  # noqa: F401 (fixtures: one embedder, a memory per test)
from trainer.dataset import shared_examples
from trainer.docquestions import (
    DUPLICATE,
    NOT_A_QUESTION,
    OTHER_SECTION,
    UNSUPPORTED,
    generate_questions,
    parse_pairs,
    support,
)
from trainer.docsource import DocumentSettings, read_path
from trainer.documents import import_document

DOCS = Path(__file__).parent / "data" / "docs"
SETTINGS = DocumentSettings(gateway_url="http://gateway.test", docs_questions=6)
# what the model "writes" for each section of tests/data/docs/handbook.md
REPLIES = {
    "Onboarding": "Q: What does the handbook cover?\nA: your first week",
    "Onboarding › Laptops": (
        "1. Q: Which laptop does a new hire get?\n   A: a 14-inch ThinkPad X1 Carbon\n"
        "2. **Q:** Where do I collect my laptop?\n   **A:** from room 2.14 before 10:00\n"
        "3. Q: Which laptop does a new hire get?\n   A: a ThinkPad\n"  # a duplicate
        "4. Q: What colour is the laptop?\n   A: bright red with stickers\n"  # not in the section
        "5. Q: Tell me about laptops\n   A: a ThinkPad X1 Carbon\n"  # not a question
        "6. Q: What does a lost badge cost to replace?\n   A: the dock is included"),  # another section's
    "Onboarding › Badges": 'Sure! Here they are: [{"question": "Who prints the badges?", "answer": "reception"}]',
    "Onboarding › Badges › Lost badges": "I am sorry, I cannot help with that.",  # no pair at all
    "Onboarding › Help": "Q: How do I reach IT?\nA: write to [EMAIL] or call [PHONE]",
}


def _section_of(prompt: str) -> str:
    return re.search(r"^Section: (.+)$", prompt, re.MULTILINE).group(1)


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class Gateway:
    """A fake gateway behind httpx's MockTransport: each section's fixed reply, the titles asked."""

    def __init__(self, replies: dict[str, str], failing: str | None = None) -> None:
        self.replies, self.failing, self.asked = replies, failing, []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        title = _section_of(body["messages"][-1]["content"])
        self.asked.append(title)
        if title == self.failing:
            return httpx.Response(503, text="overloaded")
        return httpx.Response(200, json=completion(self.replies[title]))

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self), base_url=SETTINGS.gateway_url)


def load(session, memory, path: Path, **kw):
    return import_document(session, memory, read_path(path, SETTINGS)[0],
                           section_chars=SETTINGS.docs_section_chars, **kw).document


def generate(session, embedder, doc, gateway: Gateway):
    with gateway.client() as client:
        return generate_questions(session, client, embedder, doc, SETTINGS)


def remember(session, memory, doc, rows) -> None:
    for row in rows:
        memory.remember(session, **memory_item(row, doc))


def by_question(session, doc_id) -> dict:
    """The document's current questions by their text (a duplicate's filtered row under the one kept)."""
    rows = current_questions(session, doc_id)
    return {row.question: row for row in sorted(rows, key=lambda r: r.status != DocQuestionState.filtered)}


# -- parsing and checks ------------------------------------------------------------------------
def test_a_reply_is_parsed_robustly_and_a_bad_one_yields_nothing():
    assert parse_pairs("Q: Who?\nA: Aino.\nQ: When?\nA: At noon.") == [("Who?", "Aino."), ("When?", "At noon.")]
    assert parse_pairs("1) Question 1: Who?\n   Answer 1: Aino\n- **Q:** Where?\n- **A:** Tartu") == [
        ("Who?", "Aino"), ("Where?", "Tartu")]
    assert parse_pairs('noise [{"question": "Who?", "answer": "Aino"}, {"question": 3}] noise') == [("Who?", "Aino")]
    assert parse_pairs("Q: a question without its answer") == []
    for garbage in ("", "I cannot help with that.", "[not json]", '{"question": "Who?"}', "A: an answer alone"):
        assert parse_pairs(garbage) == []


def test_an_answer_is_supported_by_its_sections_words():
    section = "Every new hire gets a 14-inch ThinkPad X1 Carbon, set up by the IT desk."
    assert support("a 14-inch ThinkPad X1 Carbon", section) == 1.0
    assert support("the IT desk sets it up", section) == 0.5  # "sets" is the model's; "it", "up" carry nothing
    assert support("Yes.", section) == 0.0  # no content word at all


# -- generation, filtering, the report ---------------------------------------------------------
def test_generated_questions_are_filtered_stored_and_reported(db_url, memory, embedder):
    gateway = Gateway(REPLIES)
    with session_scope() as s:
        doc = load(s, memory, DOCS / "handbook.md")
        done = generate(s, embedder, doc, gateway)
        assert (done.asked, done.kept, done.unanswered, done.left, done.error) == (5, 5, 1, 0, None)
        assert done.filtered == {DUPLICATE: 1, UNSUPPORTED: 1, NOT_A_QUESTION: 1, OTHER_SECTION: 1}
        rows = by_question(s, doc.id)
        waiting = {r.question for r in pending_questions(s, doc.id)}
        assert waiting == {"What does the handbook cover?", "Which laptop does a new hire get?",
                           "Where do I collect my laptop?", "Who prints the badges?", "How do I reach IT?"}
        assert rows["What colour is the laptop?"].reason == UNSUPPORTED
        assert rows["What does a lost badge cost to replace?"].reason == OTHER_SECTION
        assert rows["Where do I collect my laptop?"].answer == "from room 2.14 before 10:00"
        report = question_report(s, doc.id)
        assert (report.generated, report.pending, report.approved, report.rejected) == (9, 5, 0, 0)
        assert report.share(sum(report.filtered.values())) == pytest.approx(4 / 9)
        # asked again: only the section whose reply held no pair
        assert [sec.title for sec in sections_to_ask(s, doc.id)] == ["Onboarding › Badges › Lost badges"]
        again = generate(s, embedder, doc, gateway)
        assert (again.asked, again.kept, again.unanswered) == (1, 0, 1)
        assert gateway.asked.count("Onboarding › Badges › Lost badges") == 2 and len(gateway.asked) == 6


def test_a_failing_gateway_stops_the_run_and_the_rest_waits(db_url, memory, embedder):
    with session_scope() as s:
        doc = load(s, memory, DOCS / "handbook.md")
        done = generate(s, embedder, doc, Gateway(REPLIES, failing="Onboarding › Badges"))
        assert (done.asked, done.left) == (2, 3) and "503" in done.error
        assert sections_to_ask(s, doc.id)[0].title == "Onboarding › Badges"
        rest = generate(s, embedder, doc, Gateway(REPLIES))
        assert (rest.asked, rest.error) == (3, None)


# -- review ------------------------------------------------------------------------------------
def test_batch_approval_makes_examples_and_memory_items(db_url, memory, embedder):
    with session_scope() as s:
        doc = load(s, memory, DOCS / "handbook.md", visible_in=None)
        generate(s, embedder, doc, Gateway(REPLIES))
        doc, rows = approve_document(s, doc.id, actor="UADMIN01")
        remember(s, memory, doc, rows)
        assert len(rows) == 5 and all(r.status == DocQuestionState.approved and r.decided_by == "UADMIN01" for r in rows)
        examples = {s.get(Example, r.example_id).messages[-1]["content"]: s.get(Example, r.example_id) for r in rows}
        laptop = examples["Which laptop does a new hire get?"]
        assert (laptop.source, laptop.answer, laptop.visible_in) == ("document", "a 14-inch ThinkPad X1 Carbon", None)
        assert laptop.provenance["document_id"] == doc.id and laptop.provenance["doc_question"] in {r.id for r in rows}
        assert {ex.id for ex in examples.values()} <= {ex.id for ex in shared_examples(s)}  # they train
        items = memory_items_by_key(s, [question_key(r) for r in rows])
        assert len(items) == 5 and all(i.active and i.source == "import" for i in items)
        found = memory.plan_for("Which laptop will a new hire get?", channel="CANY", session=s)
        assert found.direct is not None and found.direct.answer == "a 14-inch ThinkPad X1 Carbon"
        (event,) = list_audit(s, action="docquestion.approve")
        assert event.detail["batch"] and sorted(event.detail["questions"]) == sorted(r.id for r in rows)
        assert question_report(s, doc.id).approved_as_is == 5
        with pytest.raises(InvalidStateError, match="no question from document"):
            approve_document(s, doc.id, actor="UADMIN01")


def test_one_question_is_edited_or_rejected(db_url, memory, embedder):
    with session_scope() as s:
        doc = load(s, memory, DOCS / "handbook.md", visible_in="CTEAM001")
        generate(s, embedder, doc, Gateway(REPLIES))
        rows = by_question(s, doc.id)
        laptop, badges = rows["Which laptop does a new hire get?"], rows["Who prints the badges?"]
        _doc, edited = decide_question(s, laptop.id, actor="UREV0001", approve=True, answer="A ThinkPad X1 Carbon.")
        assert edited.edited and s.get(Example, edited.example_id).answer == "A ThinkPad X1 Carbon."
        assert s.get(Example, edited.example_id).visible_in == "CTEAM001"  # where the document is visible
        _doc, rejected = decide_question(s, badges.id, actor="UREV0001", approve=False)
        assert rejected.status == DocQuestionState.rejected and rejected.example_id is None
        with pytest.raises(InvalidStateError, match="already rejected by <@UREV0001>"):
            decide_question(s, badges.id, actor="UADMIN01", approve=True)
        with pytest.raises(InvalidStateError, match="empty"):
            decide_question(s, rows["How do I reach IT?"].id, actor="UREV0001", approve=True, question=" ")
        report = question_report(s, doc.id)
        assert (report.approved, report.approved_as_is, report.rejected, report.pending) == (1, 0, 1, 3)


# -- re-import and removal ---------------------------------------------------------------------
def test_reimport_after_editing_one_section_changes_only_its_questions(db_url, memory, embedder, tmp_path):
    path = tmp_path / "handbook.md"
    shutil.copy(DOCS / "handbook.md", path)
    with session_scope() as s:
        doc = load(s, memory, path)
        generate(s, embedder, doc, Gateway(REPLIES))
        rows = by_question(s, doc.id)
        taught = [rows["Which laptop does a new hire get?"], rows["Who prints the badges?"]]
        for row in taught:
            d, approved = decide_question(s, row.id, actor="UADMIN01", approve=True)
            remember(s, memory, d, [approved])
        before = {r.id: (r.status, r.updated_at) for r in current_questions(s, doc.id)}
    path.write_text(path.read_text().replace("14-inch ThinkPad X1 Carbon", "16-inch MacBook Pro"))
    with session_scope() as s:
        doc = load(s, memory, path)
        laptops = next(sec for sec in sections_of(s, doc.id) if sec.title == "Onboarding › Laptops")
        now = {r.id: r for r in current_questions(s, doc.id)}
        gone = set(before) - set(now)
        assert gone and all(s.get(DocQuestion, i).section_id == laptops.id for i in gone)
        for question_id in gone:  # the edited section's: stale (filtered ones stay so), approved ones stop teaching
            expected = DocQuestionState.filtered if before[question_id][0] == "filtered" else DocQuestionState.stale
            assert s.get(DocQuestion, question_id).status == expected
        old_laptop = s.get(DocQuestion, taught[0].id)
        assert s.get(Example, old_laptop.example_id).status == ExampleStatus.excluded
        assert not memory_items_by_key(s, [question_key(old_laptop)])[0].active
        for question_id, row in now.items():  # every other section's: as they were
            assert (row.status, row.updated_at) == before[question_id]
        assert memory_items_by_key(s, [question_key(taught[1])])[0].active
        assert s.get(Example, taught[1].example_id).status == ExampleStatus.active
        # only the edited section (and the one whose reply held nothing) is asked again
        assert [sec.title for sec in sections_to_ask(s, doc.id)] == ["Onboarding › Laptops",
                                                                      "Onboarding › Badges › Lost badges"]
        new_reply = {**REPLIES, "Onboarding › Laptops": "Q: Which laptop does a new hire get?\nA: a 16-inch MacBook Pro"}
        gateway = Gateway(new_reply)
        generate(s, embedder, doc, gateway)
        assert gateway.asked == ["Onboarding › Laptops", "Onboarding › Badges › Lost badges"]
        assert by_question(s, doc.id)["Which laptop does a new hire get?"].answer == "a 16-inch MacBook Pro"


def test_a_removed_documents_questions_go(db_url, memory, embedder):
    with session_scope() as s:
        doc = load(s, memory, DOCS / "handbook.md")
        generate(s, embedder, doc, Gateway(REPLIES))
        first = pending_questions(s, doc.id)[0]
        d, approved = decide_question(s, first.id, actor="UADMIN01", approve=True)
        remember(s, memory, d, [approved])
        remove_document(s, doc.id)
        assert pending_questions(s, doc.id) == [] and current_questions(s, doc.id) == []
        assert s.get(DocQuestion, first.id).status == DocQuestionState.stale
        assert not memory_items_by_key(s, [question_key(first)])[0].active
        assert s.get(Example, approved.example_id).status == ExampleStatus.excluded
        assert memory.plan_for("Which laptop does a new hire get?", channel="CANY", session=s).used == []


# -- the commands ------------------------------------------------------------------------------
class SectionReplies(FakeGateway):
    """A real HTTP fake gateway (tests/support/fake_gateway.py) answering each section's reply."""

    def respond(self, handler, question: str) -> None:
        handler._send(200, "application/json", json.dumps(completion(REPLIES[_section_of(question)])).encode())


def test_the_commands_generate_report_and_approve(db_url, embedder, monkeypatch):
    gateway = SectionReplies()
    monkeypatch.setenv("FLYWHEEL_GATEWAY_URL", gateway.url)
    monkeypatch.setenv("FLYWHEEL_DOCS_QUESTIONS", "6")
    runner = CliRunner()
    try:
        assert runner.invoke(app, ["docs", "import", str(DOCS / "handbook.md")]).exit_code == 0
        with session_scope() as s:
            (doc, _n), = list_documents(s)
            doc_id = doc.id
        shown = runner.invoke(app, ["docs", "questions", str(doc_id), "--generate"])
    finally:
        gateway.stop()
    assert shown.exit_code == 0, shown.output
    assert f"{doc_id}: asked about 5 sections: 5 questions wait for review, 4 filtered" in shown.output
    assert ("9 generated, 4 filtered (1 duplicate, 1 answer not in the section, 1 not a question, "
            "1 finds another section), 5 waiting for review") in shown.output
    assert "filtered 44%" in shown.output and "\tQ: Who prints the badges?\tA: reception" in shown.output
    question_id = re.search(r"^  (\d+)\tOnboarding › Help", shown.output, re.MULTILINE).group(1)
    rejected = runner.invoke(app, ["docs", "reject-question", question_id, "--as", "UREV0001"])
    assert rejected.exit_code == 0 and "rejected question" in rejected.output
    approved = runner.invoke(app, ["docs", "approve", str(doc_id)])
    assert approved.exit_code == 0, approved.output
    assert "approved 4 questions" in approved.output and "answer from the memory now" in approved.output
    again = runner.invoke(app, ["docs", "approve", str(doc_id)])
    assert again.exit_code == 1 and "waits for review" in again.output
    report = runner.invoke(app, ["docs", "questions"])
    assert "4 approved (4 as generated), 1 rejected; approved as generated 44%" in report.output


# -- the admin channel -------------------------------------------------------------------------
REVIEWER, BOB = "UREVIEW01", "UBOB0001"


def shown(call) -> str:
    return json.dumps(call.args.get("blocks"), ensure_ascii=False)


def press(bot: BotServer, action_id: str, value: int, ts: str, user: str = REVIEWER):
    resp = bot.sender.block_action(action_id=action_id, value=str(value), channel=ADMIN_CHANNEL, message_ts=ts,
                                   user=user)
    assert resp.status_code == 200
    return bot.sender.last_response_id


def test_the_admin_channel_reviews_a_documents_questions(sqlite_url, memory):
    with session_scope() as s:
        doc = load(s, memory, DOCS / "handbook.md")
        laptops, badges = (sec for sec in sections_of(s, doc.id) if sec.title in ("Onboarding › Laptops",
                                                                                    "Onboarding › Badges"))
        first, second, _filtered = add_questions(s, laptops, [
            ("Which laptop does a new hire get?", "a 14-inch ThinkPad X1 Carbon", None),
            ("Where do I collect my laptop?", "from room 2.14", None), ("Colour?", "red", UNSUPPORTED)])
        (third,) = add_questions(s, badges, [("Who prints the badges?", "reception", None)])
        private = load(s, memory, DOCS / "parking.txt", visible_in="CPRIV001")
        add_questions(s, sections_of(s, private.id)[0], [("How many parking spaces are there?", "forty", None)])
    gateway = FakeGateway()
    bot = BotServer(gateway_url=gateway.url, reviewers=[REVIEWER]).start()
    try:
        post = bot.double.wait_for("chat.postMessage", lambda c: c.args.get("channel") == ADMIN_CHANNEL
                                   and docreview.APPROVE_ALL in shown(c))[0]
        ts = post.response["ts"]
        assert "Which laptop does a new hire get?" in shown(post) and "Onboarding › Badges" in shown(post)
        assert "Colour?" not in shown(post) and "Approve all 3" in shown(post)
        hidden = bot.double.wait_for("chat.postMessage", lambda c: "visible only in <#CPRIV001>" in c.args.get("text", ""))
        assert "parking spaces" not in json.dumps(hidden[0].args)
        # a non-reviewer is refused, audited
        rid = press(bot, docreview.APPROVE_ALL, doc.id, ts, user=BOB)
        assert "Only Flywheel admins and reviewers" in bot.double.wait_for(
            "response", lambda c: c.args["response_id"] == rid)[0].args["text"]
        # one rejected, one edited in the modal, the rest approved at once
        press(bot, docreview.REJECT, second.id, ts)
        bot.double.wait_for("chat.update", lambda c: c.args.get("ts") == ts and "rejected by <@UREVIEW01>" in shown(c))
        press(bot, docreview.EDIT, first.id, ts)
        modal = bot.double.wait_for("views.open", lambda c: docreview.EDIT_VIEW in json.dumps(c.args))[0]
        assert "a 14-inch ThinkPad X1 Carbon" in json.dumps(modal.args)
        answer = {docreview.TEXT_INPUT: {"type": "plain_text_input", "value": "A 14-inch ThinkPad X1 Carbon."}}
        resp = bot.sender.view_submission(callback_id=docreview.EDIT_VIEW, user=REVIEWER,
                                          values={docreview.ANSWER_BLOCK: answer},
                                          private_metadata=json.dumps({"question_id": first.id}))
        assert resp.status_code == 200 and not resp.content
        bot.double.wait_for("chat.update", lambda c: c.args.get("ts") == ts and "approved (edited) by" in shown(c))
        press(bot, docreview.APPROVE_ALL, doc.id, ts)
        final = bot.double.wait_for("chat.update", lambda c: c.args.get("ts") == ts
                                    and docreview.APPROVE not in shown(c))[0]
        assert shown(final).count(":white_check_mark: approved") == 2 and "rejected by" in shown(final)
    finally:
        bot.stop()
        gateway.stop()
    with session_scope() as s:
        rows = {r.id: r for r in current_questions(s, doc.id)}
        assert rows[first.id].answer == "A 14-inch ThinkPad X1 Carbon." and rows[first.id].edited
        assert rows[third.id].status == DocQuestionState.approved and rows[third.id].decided_by == REVIEWER
        items = memory_items_by_key(s, [question_key(rows[first.id]), question_key(rows[third.id])])
        assert len(items) == 2 and all(i.active for i in items)
        assert [e.outcome for e in list_audit(s, action="docquestion.approve")].count("refused") == 1
