"""Learning from what people rejected, beside SFT (FLYWHEEL_OBJECTIVE):
- `sft+dpo`: DPO on (prompt, the answer someone taught, the bot's answer they voted down) pairs;
- `kto`: KTO on unpaired answers: every answer people taught or liked is desirable, every answer
  they voted down undesirable, whether or not someone wrote a better one (the snapshot's
  `rejected` split holds those voted down with nothing taught).
The reference is the base model: the adapter switched off (PEFT's `disable_adapter()`), so no
second copy of the model is kept. Losses follow the DPO (Rafailov et al. 2023, Eq. 7) and KTO
(Ethayarajh et al. 2024, Eq. 7) papers; tests/test_preference.py checks both against TRL's
implementation on a tiny model. The evaluation side (margins, repeated rejected answers) is
`preference_metrics`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.batching import collate
from trainer.encode import IGNORE, Encoded, encode_example
from trainer.modeling import causal_lm_parts, hidden_states

OBJECTIVES = ("sft", "sft+dpo", "kto")


@dataclass
class Pair:
    chosen: Encoded
    rejected: Encoded
    mismatched: Encoded | None = None  # this prompt with another pair's taught answer (KTO's KL term)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the log-probabilities of each sequence's target tokens (labels != IGNORE), [B]."""
    _, head = causal_lm_parts(model)
    hidden = hidden_states(model, batch)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logps = torch.log_softmax(head(hidden[:, :-1][keep]).float(), dim=-1)
    token = logps.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(targets.size(0), device=token.device, dtype=token.dtype).index_add(0, rows, token)


def reference_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model's sequence log-probs: the LoRA adapter switched off, no gradients."""
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, batch)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> torch.Tensor:
    """-log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))]), averaged over pairs."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """1 - σ(β (r - z)) for desirable answers, 1 - σ(β (z - r)) for undesirable ones, r = log π/π_ref,
    z the (detached, non-negative) KL estimate; averaged over all answers."""
    ratio = logps - ref_logps
    z = kl.detach().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))))
    return losses.mean()


def kl_estimate(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """KTO's reference point: mean log π/π_ref on mismatched (prompt, answer) pairs (the batch's
    answers shifted by one), detached."""
    with torch.no_grad():
        return (sequence_logps(model, batch) - reference_logps(model, batch)).mean()


@dataclass
class Unpaired:
    """One answer for KTO: desirable or not, and its prompt with another answer (the KL term)."""
    answer: Encoded
    desirable: bool
    mismatched: Encoded


def is_pair(row: dict) -> bool:
    """A preference pair: a taught answer and a different answer people voted down."""
    rejected = row.get("rejected_answer")
    return bool(row.get("answer") and rejected and rejected.strip() != row["answer"].strip())


def encode_pairs(tokenizer, rows, max_length: int) -> list[Pair]:
    """Items with a better answer and a different rejected one, all within max_length."""
    kept = [r for r in rows if is_pair(r)]
    out = []
    for i, row in enumerate(kept):
        other = kept[(i + 1) % len(kept)]["answer"]
        pair = Pair(encode_example(tokenizer, row["messages"], row["answer"]),
                    encode_example(tokenizer, row["messages"], row["rejected_answer"]),
                    encode_example(tokenizer, row["messages"], other))
        if max(len(pair.chosen), len(pair.rejected), len(pair.mismatched)) <= max_length:
            out.append(pair)
    return out


def unpaired_answers(rows) -> list[tuple[list[dict], str, bool]]:
    """(messages, answer, desirable) for KTO: each taught or liked answer desirable, each
    different voted-down one undesirable (a pair's rejected side, or a rejected-only row's);
    class labels are no answer anyone liked or disliked."""
    out = []
    for row in rows:
        if row.get("label"):
            continue
        if row.get("answer"):
            out.append((row["messages"], row["answer"], True))
        if is_pair(row) or (not row.get("answer") and row.get("rejected_answer")):
            out.append((row["messages"], row["rejected_answer"], False))
    return out


def encode_unpaired(tokenizer, rows, max_length: int) -> list[Unpaired]:
    """KTO's items from snapshot rows (the train split and the rejected split), all within
    max_length; each with its prompt and another liked answer for the KL term."""
    found = unpaired_answers(rows)
    liked = [answer for _m, answer, good in found if good] or [answer for _m, answer, _g in found]
    out = []
    for i, (messages, answer, good) in enumerate(found):
        other = liked[(i + 1) % len(liked)]
        item = Unpaired(encode_example(tokenizer, messages, answer), good, encode_example(tokenizer, messages, other))
        if max(len(item.answer), len(item.mismatched)) <= max_length:
            out.append(item)
    return out


def preference_items(objective: str, tokenizer, dataset, max_length: int) -> list | None:
    """What the objective trains on beside SFT, from a snapshot's DatasetDict: DPO pairs, KTO
    unpaired answers, or None for SFT alone."""
    train = list(dataset["train"])
    if objective == "sft+dpo":
        return encode_pairs(tokenizer, train, max_length)
    if objective == "kto":
        rejected = list(dataset["rejected"]) if "rejected" in dataset else []
        return encode_unpaired(tokenizer, train + rejected, max_length)
    return None


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch: the chosen answers, then the rejected ones (as TRL lays them out)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def dpo_step_loss(model, pairs: list[Pair], pad_id: int, beta: float, device: torch.device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in pair_batch(pairs, pad_id).items()}
    policy = sequence_logps(model, batch)
    ref = reference_logps(model, batch)
    n = len(pairs)
    return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta)


def kto_step_loss(model, items: list[Unpaired], pad_id: int, beta: float, device: torch.device) -> torch.Tensor:
    """KTO on a batch of unpaired answers; the KL reference point from the same prompts with
    mismatched answers."""
    batch = {k: v.to(device) for k, v in collate([it.answer for it in items], pad_id).items()}
    policy = sequence_logps(model, batch)
    ref = reference_logps(model, batch)
    mismatched = {k: v.to(device) for k, v in collate([it.mismatched for it in items], pad_id).items()}
    desirable = torch.tensor([it.desirable for it in items], device=policy.device)
    return kto_loss(policy, ref, desirable, kl_estimate(model, mismatched), beta)


@dataclass
class PreferenceMetrics:
    pairs: int
    mean_margin: float  # mean of log π(chosen) - log π(rejected), per pair (sums over tokens)
    positive_share: float  # share of pairs with a positive margin


def preference_metrics(model, pairs: list[Pair], pad_id: int, device: torch.device,
                       batch_size: int = 8) -> PreferenceMetrics | None:
    """The candidate's preference between the taught and the rejected answer on held-out pairs."""
    if not pairs:
        return None
    margins = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            batch = {k: v.to(device) for k, v in pair_batch(chunk, pad_id).items()}
            logps = sequence_logps(model, batch)
            margins += (logps[:len(chunk)] - logps[len(chunk):]).tolist()
    return PreferenceMetrics(len(margins), round(sum(margins) / len(margins), 4),
                             round(sum(m > 0 for m in margins) / len(margins), 4))


def repeats_rejected(prediction: str, chosen: str, rejected: str) -> bool:
    """The model said (nearly) what people voted down: closer to the rejected answer than to the
    taught one, by token F1, and at least half the rejected answer's words."""
    from trainer.metrics import token_f1

    to_rejected = token_f1(prediction, rejected)
    return to_rejected >= 0.5 and to_rejected > token_f1(prediction, chosen)
