"""The demo's docs phase (`flywheel demo run --docs DIR [--until docs]`, issue 28) without starting
any service: the summary and table with and without it, the citation read back from the bot's
message and checked against the sections it names, and the CLI's refusals."""
from __future__ import annotations

from datetime import datetime

from typer.testing import CliRunner

from bot.blocks import answer_blocks
from flywheel.app.cli import app
from flywheel.app.demo.script import (
    Fact,
    answer_in,
    check_citations,
    cited_sections,
    make_rows,
    render_table,
    summarize,
)
from flywheel.app.demo.workspace import _source
from flywheel.memory import MemoryPlan, Recalled, citation
from store.models import SECTION_SOURCE

SECTIONS = {
    "Handbook › Releases": ["We ship a minor release every six weeks, always on a Thursday. Patches come when needed."],
    "Handbook › Ports & <things>": ["The server listens on port 7461 by default."],
}


def _rows():
    facts = [Fact("How often do we release?", "We ship a minor release every six weeks, always on a Thursday.",
                  ["what's the release cadence?"]),
             Fact("Which port?", "The server listens on port 7461 by default.", ["default port?"])]
    return make_rows(facts, [Fact("What is 2 + 2?", "4")], paraphrases=1)


def _cite(*titles: str) -> str:
    """The citation the bot writes under an answer that used these sections, as the demo reads it
    back from the Slack message."""
    plan = MemoryPlan(notes=[Recalled(i, t, "text", SECTION_SOURCE, None, datetime(2026, 12, 2), 0.5)
                             for i, t in enumerate(titles)])
    blocks = answer_blocks("answer", model_version="base", latency_ms=10, style="buttons", source=citation(plan))
    return _source({"blocks": blocks})


def test_the_citation_under_an_answer_names_its_sections_unescaped():
    assert cited_sections(_cite("Handbook › Releases", "Handbook › Ports & <things>")) == list(SECTIONS)
    assert cited_sections(_source({"blocks": answer_blocks("a", model_version=None, latency_ms=1,
                                                           style="buttons")})) == []
    taught = "Based on a correction by <@U1>, 20 Nov; From *Handbook › Releases*, imported 2 Dec"
    assert cited_sections(taught) == ["Handbook › Releases"]


def test_a_section_holds_an_answer_when_it_has_the_answers_content_words():
    truth = "The server listens on port 7461 by default."
    assert answer_in(truth, "Out of the box the server listens on port 7461 (by default), see below.")
    assert answer_in(truth, "The server by default listens on port 7461.")
    assert answer_in(truth, "The server listens on port 7461.")  # 4 of its 5 content words
    assert not answer_in(truth, "The server listens on port 8080 by default.")  # a number is never left out
    assert not answer_in(truth, "The port is 7461.")
    assert not answer_in(truth, "")


def test_each_docs_row_is_checked_against_the_sections_its_answer_cites():
    rows = _rows()
    release, release_p, port, port_p, general = rows
    release.record("docs", "every six weeks", source=_cite("Handbook › Releases"))
    release_p.record("docs", "every six weeks", source=_cite("Handbook › Ports & <things>"))  # the wrong section
    port.record("docs", "7461", source=_cite("Handbook › Releases", "Handbook › Ports & <things>"))
    port_p.record("docs", "7461", source=None)  # cites nothing
    general.record("docs", "4", source=None)
    check_citations(rows, SECTIONS)
    assert [r.docs_cite_ok for r in rows] == [True, False, True, False, None]
    assert port.docs_cited == list(SECTIONS) and port_p.docs_cited == []
    s = summarize(rows)
    assert s["asked"]["docs_cite_ok"] == 1.0 and s["paraphrase"]["docs_cite_ok"] == 0.0
    assert "docs_cite_ok" not in s["general"]


def test_the_summary_and_table_show_the_docs_phase_only_when_it_ran():
    rows = _rows()
    for r in rows:
        r.record("before", "nothing")
    s = summarize(rows)
    assert s["asked"]["before_f1"] == 0.0
    assert all(s[k][f"{p}_f1"] is None for k in ("asked", "paraphrase", "general")
               for p in ("docs", "memory", "after", "lora_only"))
    assert s["asked"]["docs_cite_ok"] is None
    assert "docs" not in render_table(rows) and "with memory" not in render_table(rows)
    for r in rows:
        r.record("docs", r.truth, source=None)
    s = summarize(rows)
    assert s["asked"]["docs_f1"] == s["paraphrase"]["docs_f1"] == s["general"]["docs_f1"] == 1.0
    table = render_table(rows)
    assert "with the docs (no correction)" in table and "F1 before → docs " in table
    assert "0.00 → 1.00" in table and "with memory" not in table


def test_the_cli_refuses_until_docs_without_docs_and_unknown_phases(tmp_path):
    runner = CliRunner()
    got = runner.invoke(app, ["demo", "run", "--until", "docs", "--output", str(tmp_path / "out")])
    assert got.exit_code == 2 and "--until docs needs --docs" in got.output
    got = runner.invoke(app, ["demo", "run", "--docs", str(tmp_path), "--until", "week"])
    assert got.exit_code == 2 and "--until must be docs" in got.output
    got = runner.invoke(app, ["demo", "run", "--docs", str(tmp_path / "missing")])
    assert got.exit_code == 2 and "no such file or folder" in got.output
