"""Chat-template encoding with the loss on the assistant's tokens only.

The prompt is rendered as the gateway renders it (flywheel.prompt.render) and the answer ends
with the template's own end of turn; the two are tokenized separately and concatenated: exactly
the token boundary the model sees when it generates after the prompt at serving time."""
from __future__ import annotations

from dataclasses import dataclass

from flywheel.prompt import chat_format, render

IGNORE = -100


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


def encode_rows(tokenizer, rows, max_length: int) -> tuple[list[Encoded], int]:
    """Encode dataset rows; items over max_length are dropped (a cut answer teaches cut answers)."""
    out, dropped = [], 0
    for row in rows:
        enc = encode_example(tokenizer, row["messages"], row["answer"])
        if len(enc) > max_length:
            dropped += 1
            continue
        out.append(enc)
    return out, dropped
