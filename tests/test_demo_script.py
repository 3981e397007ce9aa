"""The demo's bookkeeping: which questions go through the bot again after the week and what the
summary averages (every phase over the same questions), without starting any service."""
from __future__ import annotations

from flywheel.app.demo.script import Fact, make_rows, sample_recheck, summarize


def _rows():
    facts = [Fact(f"What is fact {i}?", f"Fact {i} is {i * 7}.", [f"fact {i}, what is it?", f"tell me fact {i}"])
             for i in range(10)]
    return make_rows(facts, [Fact("What is 2 + 2?", "4")], paraphrases=2)


def test_a_recheck_sample_keeps_whole_facts_and_every_general_question():
    rows = _rows()
    picked = sample_recheck(rows, 3)
    facts = {r.fact for r in picked if not r.general}
    assert len(facts) == 3 and len(picked) == 3 * 3 + 1  # each fact's question and both paraphrases
    assert [r.question for r in picked if r.general] == ["What is 2 + 2?"]
    assert sample_recheck(_rows(), 3) and {r.fact for r in sample_recheck(_rows(), 3) if not r.general} == facts
    assert len(sample_recheck(_rows(), None)) == len(rows) == len(sample_recheck(_rows(), 50))


def test_the_summary_averages_every_phase_over_the_rechecked_rows_only():
    rows = _rows()
    picked = sample_recheck(rows, 2)
    for r in rows:
        r.record("before", "nothing")
        r.record("lora_only", "nothing")
    for r in picked:
        r.record("memory", r.truth)
        r.record("after", r.truth)
    s = summarize(rows)
    assert s["asked"]["n"] == 2 and s["paraphrase"]["n"] == 4 and s["general"]["n"] == 1
    assert s["paraphrase"]["memory_f1"] == s["paraphrase"]["after_f1"] == 1.0
    assert s["paraphrase"]["before_f1"] == 0.0
