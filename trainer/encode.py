"""Chat-template encoding with the loss on the assistant's tokens only.

The prompt and the answer are tokenized separately and concatenated: exactly the token
boundary the model sees when it generates after the prompt at serving time."""
from __future__ import annotations

from dataclasses import dataclass

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


def prompt_text(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn(tokenizer) -> str:
    """What closes an assistant turn in this template (ChatML: '<|im_end|>')."""
    return tokenizer.eos_token or ""


def encode_example(tokenizer, messages: list[dict], answer: str) -> Encoded:
    prompt_ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + end_of_turn(tokenizer), add_special_tokens=False)["input_ids"]
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
