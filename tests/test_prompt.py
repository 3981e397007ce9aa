"""The one prompt (flywheel/prompt.py): Slack text normalization, the context rules, and the
promise behind the gate: a stored conversation becomes the same token ids whether the bot
serves it (messages → the gateway's chat template) or the trainer trains and evaluates on it."""
from __future__ import annotations

import pytest

from flywheel.prompt import PromptSettings, build_messages, normalize, render, with_notes
from store.models import Message

BOT = "UBOT0001"


@pytest.mark.parametrize("raw, clean", [
    ("<@U0BOT> what is <#C123|general> for?", "what is #general for?"),
    ("ask <@U77|maria> or <@W99>", "ask @maria or @user"),
    ("<!here> deploy at 10:30:45 :rocket: :+1::skin-tone-2:", "@here deploy at 10:30:45"),
    ("the standup is at 12:30:45 sharp", "the standup is at 12:30:45 sharp"),  # not an emoji
    ("see <https://docs.example.com/a?b=1&amp;c=2|the docs> &amp; <https://x.io>", "see the docs & https://x.io"),
    ("<!subteam^S1|@oncall> <!date^1392734382^{date}|Feb 18, 2014>", "@oncall Feb 18, 2014"),
    ("<p>Hello <b>world</b></p><br/>next   line\n\n\n\nend", "Hello world\n\nnext line\n\nend"),
    ("a &lt;b&gt; is literal", "a <b> is literal"),
    (f"<@{BOT}> hi <@U123|ada> <!subteam^S1|@ops> <mailto:a@b.c> &amp; 1 &lt; 2 :tada:",
     "hi @ada @ops a@b.c & 1 < 2"),
    ("   ", ""),
])
def test_slack_text_normalization(raw, clean):
    assert normalize(raw, bot_user_id=BOT) == clean


def test_only_the_bots_own_mention_disappears_elsewhere():
    assert normalize("thanks <@UBOT> and <@U2|ann>", bot_user_id="UBOT") == "thanks and @ann"


def _msg(role: str, text: str, error: str | None = None, ts: str = "1") -> Message:
    return Message(conversation_id=1, channel="C", ts=ts, role=role, text=text, error=error)


def test_context_keeps_the_newest_turns_that_fit_and_starts_with_the_user():
    history = [_msg("user", "q1 " * 50), _msg("assistant", "a1"), _msg("user", f"<@{BOT}> q2"),
               _msg("assistant", "sorry", error="gateway down"), _msg("assistant", "a2"), _msg("user", "q3")]

    def rules(**kw):
        return PromptSettings(**{"bot_user_id": BOT, "context_max_messages": 10, "context_max_chars": 10_000, **kw})

    full = build_messages(history, rules())
    assert [m["content"] for m in full][1:] == ["a1", "q2", "a2", "q3"]  # the apology is left out
    short = build_messages(history, rules(context_max_messages=3, system_prompt="Be brief."))
    assert short == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q2"},
                     {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}]
    assert build_messages(history, rules(context_max_messages=2)) == [{"role": "user", "content": "q3"}]
    tight = build_messages(history, rules(context_max_chars=200))
    assert tight[-1]["content"] == "q3" and sum(len(m["content"]) for m in tight) <= 200
    huge = build_messages([_msg("user", "x" * 5000)], rules(context_max_chars=300))
    assert huge == [{"role": "user", "content": "x" * 300}]
    # the bot's own answer is never the last turn of a prompt
    assert build_messages([_msg("user", "q"), _msg("assistant", "a")], rules()) == [{"role": "user", "content": "q"}]


def test_notes_join_the_system_turn():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    noted = with_notes(msgs, [("When is lunch?", "Lunch is at noon.")])
    assert noted[0]["content"].startswith("Be brief.\n\n") and "Lunch is at noon." in noted[0]["content"]
    assert noted[1:] == msgs[1:] and with_notes(msgs, []) is msgs


def test_serving_and_training_give_the_same_token_ids(sqlite_url, tiny_model_dir, tmp_path, monkeypatch):
    """One stored thread with Slack markup, a failed answer and a correction: the prompt the bot
    sends for the corrected question and the prompt the trainer trains on are the same tokens."""
    from transformers import AutoTokenizer

    from store.conversations import record_message, thread_messages
    from store.db import session_scope
    from store.examples import list_examples
    from store.feedback import upsert_vote
    from store.channels import record_channel_visibility
    from store.models import Role, Visibility
    from trainer.dataset import build_snapshot
    from trainer.encode import encode_example
    from trainer.settings import TrainerSettings

    monkeypatch.setenv("FLYWHEEL_SYSTEM_PROMPT", "You answer questions about Lumenfold.")
    monkeypatch.setenv("FLYWHEEL_BOT_USER_ID", BOT)
    turns = [("1.1", Role.user, f"<@{BOT}> hi, the demo is at 12:30:45 :tada: in <#C1|general>", None),
             ("1.2", Role.assistant, ":warning: Sorry, I can't reach the model right now.", "gateway down"),
             ("1.3", Role.user, "<b>still</b> there? ask <@U77|maria> &amp; me", None),
             ("1.4", Role.assistant, "Yes, I am here.", None),
             ("1.5", Role.user, f"<@{BOT}> when is the demo?", None),
             ("1.6", Role.assistant, "I don't know.", None)]
    with session_scope() as s:
        record_channel_visibility(s, "CPROMPT", Visibility.public)  # only what everyone sees trains
        for ts, role, text, error in turns:
            msg = record_message(s, channel="CPROMPT", ts=ts, thread_ts="1.1", role=role, text=text,
                                 author="UALICE01" if role == Role.user else BOT, error=error)
        upsert_vote(s, message_id=msg.id, user="UALICE01", kind="correction", value="correction",
                    correction="The demo is at 12:30:45 in #general.")
        history = thread_messages(s, "CPROMPT", "1.1", limit=40)
    # serving: the bot's messages for the last question (the answer to it not yet written)
    served = build_messages(history[:-1], PromptSettings())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    gateway_ids = tokenizer.apply_chat_template(served, add_generation_prompt=True, tokenize=True)
    if isinstance(gateway_ids, dict) or hasattr(gateway_ids, "keys"):
        gateway_ids = gateway_ids["input_ids"]
    # training: the example the trainer derives and cleans from the same store rows
    cfg = TrainerSettings(data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad")
    with session_scope() as s:
        snap = build_snapshot(s, cfg)
        assert len(list_examples(s)) == 1
    row = next(r for r in snap.dataset["train"] if r["source"] == "correction")
    assert row["messages"] == served
    enc = encode_example(tokenizer, row["messages"], row["answer"])
    prompt_ids = [t for t, lab in zip(enc.input_ids, enc.labels) if lab == -100]
    assert prompt_ids == list(gateway_ids)
    assert tokenizer(render(tokenizer, served), add_special_tokens=False)["input_ids"] == list(gateway_ids)
    assert "12:30:45" in served[1]["content"] and all("Sorry" not in m["content"] for m in served)
