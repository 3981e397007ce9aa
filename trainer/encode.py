"""Chat-template encoding with the loss on the assistant's tokens only.

The prompt is rendered as the gateway renders it (flywheel.prompt.render) and the answer ends
with the template's own end of turn; the two are tokenized separately and concatenated: exactly
the token boundary the model sees when it generates after the prompt at serving time.

An item over the length limit loses its oldest context turns until it fits; the system prompt,
the question and the answer always stay (a cut answer teaches cut answers)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from flywheel.logs import get_logger
from flywheel.prompt import chat_format, render

IGNORE = -100
# transformers' tokenizers without a known limit report int(1e30) as model_max_length
_NO_LIMIT = 10**9

log = get_logger("trainer.encode")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode_example(tokenizer, messages: list[dict], answer: str) -> Encoded:
    prompt_ids = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + chat_format(tokenizer).end_of_turn, add_special_tokens=False)["input_ids"]
    return Encoded(prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + list(answer_ids))


def model_limit(tokenizer, max_length: int) -> int:
    """max_length, or the model's own context (the tokenizer's model_max_length) if shorter."""
    own = tokenizer.model_max_length
    return min(max_length, own) if isinstance(own, int) and 0 < own < _NO_LIMIT else max_length


def shortened(messages: list[dict]) -> Iterator[list[dict]]:
    """The messages, then the same with ever fewer context turns, the oldest left out first; the
    system turns and the last turn (the question) always stay, and a user turn comes first."""
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    yield messages
    while len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        yield [*system, *turns]


def encode_fitted(tokenizer, messages: list[dict], answer: str, max_length: int) -> tuple[Encoded | None, bool]:
    """The item within max_length tokens, with as much of its context as fits, and whether
    context was left out; None when the system prompt, question and answer alone are too long."""
    for kept in shortened(messages):
        enc = encode_example(tokenizer, kept, answer)
        if len(enc) <= max_length:
            return enc, kept is not messages
    return None, True


def encode_rows(tokenizer, rows, max_length: int) -> tuple[list[Encoded], int]:
    """Encode dataset rows within max_length tokens (and the model's own context): items too long
    are cut from their oldest context turns; those that do not fit even then are dropped and
    counted. Returns (encoded, dropped)."""
    limit = model_limit(tokenizer, max_length)
    out, dropped, cut = [], 0, 0
    for row in rows:
        enc, was_cut = encode_fitted(tokenizer, row["messages"], row["answer"], limit)
        if enc is None:
            dropped += 1
            continue
        cut += was_cut
        out.append(enc)
    if cut:
        log.info("items cut to fit", count=cut, max_length=limit)
    return out, dropped
