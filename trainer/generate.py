"""Batched greedy generation for evaluation: prompts rendered as the gateway renders them and
stopped where the template ends an answer (flywheel.prompt), sorted by length and left-padded, so
a batch wastes little on padding, and outputs returned in the caller's order."""
from __future__ import annotations

from collections.abc import Callable

import torch

from flywheel.prompt import chat_format, render


@torch.no_grad()
def generate_answers(model, tokenizer, conversations: list[list[dict]], *, device: torch.device,
                     max_new_tokens: int = 64, batch_size: int = 16,
                     on_batch: Callable[[], None] | None = None) -> list[str]:
    prompts = [render(tokenizer, msgs) for msgs in conversations]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(encoded)
    pad = tokenizer.pad_token_id
    stop = list(chat_format(tokenizer).stop_ids)
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stop,
                             use_cache=True, temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True).strip()
        if on_batch is not None:  # progress, for the trainer's stall watch (trainer.lease)
            on_batch()
    return out
