"""`flywheel dataset export --format …`: each format is read back by a parser written from its
public specification (below, one per format), and what it holds is exactly the snapshot that
trains here: same prompts (system prompt on top), same targets, redacted, and for the preference
formats the pairs people made by voting an answer down and writing a better one.

Specifications followed:
- OpenAI chat fine-tuning: JSONL, one object per line with `messages` (and optionally `tools`,
  `parallel_tool_calls`); each message has `role` (system, developer, user, assistant, tool) and
  string `content`; `weight` (0 or 1) only on assistant messages; at least one assistant message.
- OpenAI preference fine-tuning: `input` (`messages`, optional `tools`, `parallel_tool_calls`),
  `preferred_output` and `non_preferred_output`, each a list holding one assistant message.
- TRL preference datasets, conversational: `prompt` (messages), `chosen` and `rejected` (each a
  list of assistant messages continuing the prompt).
- TRL unpaired preference datasets, conversational: `prompt` (messages), `completion` (a list of
  assistant messages continuing the prompt) and `label` (a boolean: desirable or not)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flywheel.app.cli import app
from store.db import get_engine, session_scope
from store.examples import upsert_example
from trainer.dataset import build_snapshot
from trainer.settings import TrainerSettings

ROLES = {"system", "developer", "user", "assistant", "tool"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id"}


def _message(m: dict) -> tuple[str, str]:
    assert isinstance(m, dict) and set(m) <= MESSAGE_KEYS, m
    assert m["role"] in ROLES and isinstance(m["content"], str) and m["content"], m
    assert "weight" not in m or (m["role"] == "assistant" and m["weight"] in (0, 1)), m
    return m["role"], m["content"]


def parse_openai_chat(line: str) -> tuple[tuple, str]:
    obj = json.loads(line)
    assert set(obj) <= {"messages", "tools", "parallel_tool_calls"}, obj.keys()
    msgs = [_message(m) for m in obj["messages"]]
    assert any(role == "assistant" for role, _ in msgs)
    assert msgs[-1][0] == "assistant"  # the target the model learns
    return tuple(msgs[:-1]), msgs[-1][1]


def _one_assistant(output) -> str:
    assert isinstance(output, list) and len(output) == 1, output
    role, content = _message(output[0])
    assert role == "assistant"
    return content


def parse_openai_preference(line: str) -> tuple[tuple, str, str]:
    obj = json.loads(line)
    assert set(obj) == {"input", "preferred_output", "non_preferred_output"}, obj.keys()
    assert set(obj["input"]) <= {"messages", "tools", "parallel_tool_calls"}
    prompt = tuple(_message(m) for m in obj["input"]["messages"])
    assert prompt and prompt[-1][0] == "user"
    return prompt, _one_assistant(obj["preferred_output"]), _one_assistant(obj["non_preferred_output"])


def parse_trl_dpo(line: str) -> tuple[tuple, str, str]:
    obj = json.loads(line)
    assert set(obj) == {"prompt", "chosen", "rejected"}, obj.keys()
    prompt = tuple(_message(m) for m in obj["prompt"])
    assert prompt and prompt[-1][0] == "user"
    return prompt, _one_assistant(obj["chosen"]), _one_assistant(obj["rejected"])


def parse_trl_kto(line: str) -> tuple[tuple, str, bool]:
    obj = json.loads(line)
    assert set(obj) == {"prompt", "completion", "label"}, obj.keys()
    prompt = tuple(_message(m) for m in obj["prompt"])
    assert prompt and prompt[-1][0] == "user" and isinstance(obj["label"], bool)
    return prompt, _one_assistant(obj["completion"]), obj["label"]


@pytest.fixture
def snapshot(sqlite_url, tmp_path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FLYWHEEL_SYSTEM_PROMPT", "You are the team's assistant.")
    with session_scope(get_engine(sqlite_url)) as s:
        for i in range(4):
            upsert_example(s, messages=[{"role": "user", "content": f"Where is meeting room {i}?"}],
                           answer=f"Room {i} is on floor {i + 1}.", source="import")
        upsert_example(s, messages=[{"role": "user", "content": "Who runs payroll?"}],
                       answer="Payroll is run by Aino, write to aino.virtanen@example.org.",
                       rejected_answer="Payroll is run by the CEO.", source="correction")
        upsert_example(s, messages=[{"role": "user", "content": "When is payday?"}],
                       answer="Payday is the 25th.", rejected_answer="Payday is every Friday.", source="correction")
        upsert_example(s, messages=[{"role": "user", "content": "What is the wifi password?"}],
                       answer="It is bluefern42.", rejected_answer="It is bluefern42.", source="correction")
        upsert_example(s, messages=[{"role": "user", "content": "asdf?"}], label="unclear", source="label")
        upsert_example(s, messages=[{"role": "user", "content": "Is the office open on Sunday?"}],
                       rejected_answer="Yes, always, call 555-0100.", source="rejected")  # 👎, nothing taught
        snap = build_snapshot(s, TrainerSettings(eval_fraction=0.0))
    return snap


def _export(tmp_path, fmt: str):
    out = tmp_path / f"export-{fmt}"
    res = CliRunner().invoke(app, ["dataset", "export", str(out), "--format", fmt])
    assert res.exit_code == 0, res.output
    return out


def _train_rows(snap) -> list[dict]:
    return list(snap.dataset["train"])


def _prompt(row) -> tuple:
    return tuple((m["role"], m["content"]) for m in row["messages"])


def test_openai_chat_export_holds_what_trains(snapshot, tmp_path):
    out = _export(tmp_path, "openai")
    got = [parse_openai_chat(line) for line in (out / "train.jsonl").read_text().splitlines()]
    want = [(_prompt(r), r["answer"] or r["label"]) for r in _train_rows(snapshot)]
    assert sorted(got) == sorted(want) and len(got) >= 8
    answers = [(prompt, target) for prompt, target in got if target != "unclear"]
    assert all(prompt[0] == ("system", "You are the team's assistant.") for prompt, _ in answers)  # as served
    text = (out / "train.jsonl").read_text()
    assert "aino.virtanen@example.org" not in text and "[EMAIL]" in text  # redacted as it trains
    assert json.loads((out / "manifest.json").read_text())["format"] == "openai"


@pytest.mark.parametrize("fmt, parse", [("openai-preference", parse_openai_preference), ("trl-dpo", parse_trl_dpo)])
def test_preference_exports_hold_the_voted_down_pairs(snapshot, tmp_path, fmt, parse):
    out = _export(tmp_path, fmt)
    got = sorted(parse(line) for line in (out / "train.jsonl").read_text().splitlines())
    want = sorted((_prompt(r), r["answer"], r["rejected_answer"]) for r in _train_rows(snapshot)
                  if r["rejected_answer"] and r["rejected_answer"] != r["answer"])
    assert got == want
    questions = {prompt[-1][1] for prompt, _c, _r in got}
    assert {"Who runs payroll?", "When is payday?"} <= questions  # and their learned rewordings
    assert not any("wifi" in q.lower() for q in questions)  # rejected == better: no pair
    assert all(chosen != rejected for _p, chosen, rejected in got)


def test_the_kto_export_holds_every_liked_and_every_voted_down_answer(snapshot, tmp_path):
    out = _export(tmp_path, "trl-kto")
    got = sorted(parse_trl_kto(line) for split in ("train", "rejected")
                 for line in (out / f"{split}.jsonl").read_text().splitlines())
    want = sorted([(_prompt(r), r["answer"], True) for r in _train_rows(snapshot) if r["answer"] != "unclear"]
                  + [(_prompt(r), r["rejected_answer"], False) for r in _train_rows(snapshot)
                     if r["rejected_answer"] and r["rejected_answer"] != r["answer"]]
                  + [(_prompt(r), r["rejected_answer"], False) for r in snapshot.dataset["rejected"]])
    assert got == want
    undesirable = {c for _p, c, good in got if not good}
    assert {"Payroll is run by the CEO.", "Payday is every Friday."} <= undesirable
    assert any(c.startswith("Yes, always") for c in undesirable)  # voted down with nothing taught
    assert "555-0100" not in (out / "rejected.jsonl").read_text()  # redacted as it trains
    # the other formats have no target for it: nothing to write
    assert (_export(tmp_path, "openai") / "rejected.jsonl").read_text() == ""


def test_the_chat_export_keeps_its_metadata_and_unknown_formats_are_refused(snapshot, tmp_path):
    out = _export(tmp_path, "chat")
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert any(x.get("rejected_answer") == "Payroll is run by the CEO." for x in lines)
    assert (out / "hf").is_dir()
    res = CliRunner().invoke(app, ["dataset", "export", str(tmp_path / "x"), "--format", "alpaca"])
    assert res.exit_code == 2 and "unknown format 'alpaca'" in res.output
