"""Length-grouped micro-batches: sequences of similar length share a batch, so almost no
compute goes to padding. Deterministic for a seed and epoch, so a resumed run replays the
same order."""
from __future__ import annotations

import random

import torch

from trainer.encode import IGNORE, Encoded


def plan_batches(lengths: list[int], *, batch_size: int, batch_tokens: int, seed: int, epoch: int,
                 chunk_batches: int = 64) -> list[list[int]]:
    """Index lists: shuffle, sort by length inside large chunks, cut into batches of at most
    `batch_size` sequences and `batch_tokens` padded tokens, then shuffle the batch order."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = max(batch_size * chunk_batches, 1)
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        current: list[int] = []
        for i in part:
            longest = max([lengths[j] for j in current] + [lengths[i]])
            if current and (len(current) >= batch_size or longest * (len(current) + 1) > batch_tokens):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out of attention and loss."""
    width = max(len(it) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it)
        ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def padding_waste(batches: list[list[int]], lengths: list[int]) -> float:
    """Fraction of computed positions that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1.0 - real / padded if padded else 0.0
