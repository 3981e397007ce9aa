"""The one prompt: how a stored conversation becomes model input, for serving (bot, gateway),
training and evaluation (trainer) alike. The gate can only vouch for what production serves when
all build the prompt here: the same system prompt, the same Slack-text normalization, the same
context window, the same rule for which past messages count (failed answers do not), and the
same rendering with the model's chat template (`render`, `chat_format`): where a template has
no system turn (Gemma 2, Mistral's older ones), where an answer ends (`<|im_end|>`,
`<end_of_turn>`, `<|eot_id|>`, `<|end|>`, `</s>`) and which tokens stop generation.

Normalization order matters: Slack's <…> markup first, then raw HTML tags, then entity escapes
(so a user's literal "&lt;b&gt;" survives as "<b>"), then emoji codes and whitespace."""
from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

_SLACK = re.compile(r"<([@#!][^<>]*|(?:https?|mailto|tel|ftp):[^<>]*)>")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_BLOCK_TAG = re.compile(r"<(?:br|/p|/div|/li|/h[1-6]|/tr)\s*/?>", re.IGNORECASE)
# An emoji code needs a letter and stands alone: "12:30:45" and "a:b:c" are not emoji.
_EMOJI = re.compile(r"(?<![\w:])(?::[a-z0-9_+'\-]*[a-z+][a-z0-9_+'\-]*:)+(?![\w])")
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_NEWLINES = re.compile(r"\n{3,}")
_LEADING_MENTION = re.compile(r"^\s*<@[UW][A-Z0-9]+(?:\|[^>]*)?>[\s,:]*")

NOTES_HEADER = ("Notes from the team (use a note only if it answers the question; otherwise "
                "answer as you normally would):")
NOTES_FALLBACK_SYSTEM = "You are a helpful assistant."


class PromptSettings(BaseSettings):
    """The prompt's knobs, read by the bot and the trainer from the same variables."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    system_prompt: str | None = None  # None: the chat template's own default
    context_max_messages: int = Field(default=20, ge=1)
    context_max_chars: int = Field(default=6000, ge=200)
    bot_user_id: str | None = None  # the bot's own Slack id, dropped from questions


def _slack_token(match: re.Match, bot_user_id: str | None) -> str:
    target, _, label = match.group(1).partition("|")
    if target.startswith("@"):
        if bot_user_id and target[1:] == bot_user_id:
            return ""
        return f"@{label}" if label else "@user"
    if target.startswith("#"):
        return f"#{label}" if label else "#channel"
    if target.startswith("!"):
        special = target[1:]
        if special in ("here", "channel", "everyone"):
            return f"@{special}"
        if special.startswith("subteam^"):
            return label if label.startswith("@") else f"@{label or 'group'}"
        return label  # <!date^…|fallback> and friends: the fallback text
    if target.startswith("mailto:"):
        return label or target[len("mailto:"):]
    if target.startswith("tel:"):
        return label or target[len("tel:"):]
    return label or target  # a link: its visible text


def normalize(text: str | None, *, bot_user_id: str | None = None) -> str:
    """Slack text → the plain text a model reads: markup resolved, the bot's leading mention
    dropped, HTML stripped, emoji codes removed, whitespace tidied."""
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _LEADING_MENTION.sub("", text, count=1)
    text = _SLACK.sub(lambda m: _slack_token(m, bot_user_id), text)
    text = _BLOCK_TAG.sub("\n", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _EMOJI.sub("", text)
    text = _SPACES.sub(" ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    text = _NEWLINES.sub("\n\n", text)
    return text.strip()


@dataclass(frozen=True)
class Turn:
    """One stored message as the prompt sees it."""

    role: str
    text: str
    failed: bool = False  # the bot's apology for an answer it could not give


def turns_of(messages: Iterable) -> list[Turn]:
    """Store rows (Message) or dicts ({role, content[, error]}) as turns."""
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append(Turn(m.get("role", "user"), m.get("content") or "", bool(m.get("error"))))
        else:
            out.append(Turn(m.role, m.text or "", bool(getattr(m, "error", None))))
    return out


def build_messages(history: Iterable, settings: PromptSettings, *, clean=None) -> list[dict]:
    """OpenAI chat messages for a history whose last user turn is the question being answered:
    failed answers and other roles left out, text normalized (then `clean`, e.g. redaction),
    the newest turns that fit both limits kept, a user turn first, the system prompt on top."""
    turns = []
    for turn in turns_of(history):
        if turn.failed or turn.role not in ("user", "assistant"):
            continue
        text = normalize(turn.text, bot_user_id=settings.bot_user_id)
        if clean is not None:
            text = clean(text)
        if text:
            turns.append({"role": turn.role, "content": text})
    while turns and turns[-1]["role"] != "user":  # an answer is never the last thing asked
        turns.pop()
    system = settings.system_prompt
    budget = settings.context_max_chars - len(system or "")
    kept: list[dict] = []
    for turn in reversed(turns):
        if len(kept) >= settings.context_max_messages:
            break
        if kept and len(turn["content"]) > budget:
            break
        if not kept and len(turn["content"]) > budget:  # the question itself: keep its start
            turn = {**turn, "content": turn["content"][:max(budget, 1)]}
        kept.append(turn)
        budget -= len(turn["content"])
    kept.reverse()
    while kept and kept[0]["role"] != "user":  # chat templates expect a user turn first
        kept.pop(0)
    if system and kept:
        kept.insert(0, {"role": "system", "content": system})
    return kept


def question_of(messages: list[dict]) -> str:
    """The question being answered: the last user turn."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    return ""


def with_notes(messages: list[dict], notes: list[tuple[str, str]],
               sections: list[tuple[str, str]] = ()) -> list[dict]:
    """The same messages with retrieved team notes (question, answer) and sections of the
    team's documents (title path, text) in the system turn."""
    if not notes and not sections:
        return messages
    lines = "\n".join([*(f"- Q: {q}\n  A: {a}" for q, a in notes),
                       *(f"- From the document section “{title}”:\n  " + text.replace("\n", "\n  ")
                         for title, text in sections)])
    block = f"{NOTES_HEADER}\n{lines}"
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{block}"}, *messages[1:]]
    return [{"role": "system", "content": f"{NOTES_FALLBACK_SYSTEM}\n\n{block}"}, *messages]


# ---- the model's chat template -------------------------------------------------------------------
_PROBE = "FlywheelProbe7c1e"  # text no template rewrites (nothing to trim, no markup)


@dataclass(frozen=True)
class ChatFormat:
    """What a tokenizer's chat template does, found once by rendering probe conversations."""

    template: str = field(repr=False)  # the template this was found for
    system_turn: bool  # False: the template refuses a system turn (raises) or drops it
    end_of_turn: str  # what closes an assistant turn: '<|im_end|>', '<end_of_turn>', '<|eot_id|>'...
    stop_ids: tuple[int, ...]  # tokens that end an answer: the end of turn's and the eos token


_FORMATS: WeakKeyDictionary = WeakKeyDictionary()


def chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's ChatFormat, probed on first use and kept while its template stays."""
    template = str(tokenizer.chat_template)
    found = _FORMATS.get(tokenizer)
    if found is None or found.template != template:
        end_of_turn, stop_ids = _end_of_turn(tokenizer)
        found = ChatFormat(template, _renders_system(tokenizer), end_of_turn, stop_ids)
        _FORMATS[tokenizer] = found
    return found


def render(tokenizer, messages: list[dict]) -> str:
    """The model input for `messages`, ready for the assistant's answer: the tokenizer's chat
    template with its generation prompt. Where the template has no system turn, the system
    prompt (and the team's notes in it) opens the first user turn instead. Tokenize the text
    with add_special_tokens=False: the template writes the special tokens itself."""
    if not chat_format(tokenizer).system_turn:
        messages = fold_system(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def fold_system(messages: list[dict]) -> list[dict]:
    """The same conversation without system turns: their text opens the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for i, m in enumerate(rest):
        if m["role"] == "user":
            return [*rest[:i], {**m, "content": f"{system}\n\n{m['content']}"}, *rest[i + 1:]]
    return [{"role": "user", "content": system}, *rest]


def _apply(tokenizer, messages: list[dict], generation_prompt: bool) -> str | None:
    """The template's text for a probe conversation; None where the template refuses it."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception:  # noqa: BLE001 - a refusal is jinja's raise_exception (TemplateError), a ValueError...
        return None


def _renders_system(tokenizer) -> bool:
    text = _apply(tokenizer, [{"role": "system", "content": _PROBE}, {"role": "user", "content": "Hi"}], True)
    return text is not None and _PROBE in text


def _end_of_turn(tokenizer) -> tuple[str, tuple[int, ...]]:
    """What the template writes after an assistant's text, up to and including its first special
    token ('<|end|>' of '<|end|>\\n<|endoftext|>'), and that token with eos as the stop ids; eos
    where the template writes no special token there (or cannot render an answer)."""
    eos, eos_id = tokenizer.eos_token or "", tokenizer.eos_token_id
    stops = (eos_id,) if isinstance(eos_id, int) else ()
    text = _apply(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}], False)
    if not text or _PROBE not in text:
        return eos, stops
    tail = text.rpartition(_PROBE)[2]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            token = tokenizer.convert_ids_to_tokens(token_id)
            end = tail[:tail.index(token) + len(token)]
            return end, tuple(dict.fromkeys((token_id, *stops)))
    return tail.rstrip() or eos, stops
