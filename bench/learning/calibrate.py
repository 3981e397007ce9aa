"""Calibrate the correction memory's thresholds: for each fact set, where do held-out
paraphrases of taught questions score against the taught ones (and is the top hit the right
fact), and where do general questions (which must not be answered from the memory) score?

    python bench/learning/calibrate.py [FACTS.jsonl ...]

Prints one line per set and a final `RESULT {json}` with, per answer threshold, the share of
paraphrases answered from the memory, the share of those that picked the wrong fact, and the
share of general questions that would be answered from the memory."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flywheel.embedding import load_embedder  # noqa: E402
from flywheel.memory import MemorySettings, item_vectors  # noqa: E402

DEFAULT_SETS = [ROOT / "flywheel/app/demo/data/company_facts.jsonl", *sorted((ROOT / "bench/learning/facts").glob("*.jsonl"))]
GENERAL = [json.loads(x)["question"] for x in (ROOT / "trainer/data/general_questions.jsonl").read_text().splitlines()
           if x.strip()] + [json.loads(x)["question"] for x in
                            (ROOT / "flywheel/app/demo/data/general_questions.jsonl").read_text().splitlines() if x.strip()]
THRESHOLDS = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85)


def main(paths: list[Path]) -> None:
    emb = load_embedder(str(ROOT / MemorySettings().embed_model))
    out = {}
    for path in paths:
        facts = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        taught = item_vectors(emb, [(f["question"], f["answer"]) for f in facts])  # as the memory keys items
        paras = [(i, p) for i, f in enumerate(facts) for p in f.get("paraphrases", [])[:2]]
        pv = emb.embed([p for _, p in paras])
        scores = pv @ taught.T
        top = scores.argmax(1)
        best = scores.max(1)
        right = np.array([top[j] == i for j, (i, _) in enumerate(paras)])
        gen = emb.embed(GENERAL) @ taught.T
        gbest = gen.max(1)
        row = {"facts": len(facts), "paraphrases": len(paras), "top1_right": round(float(right.mean()), 3),
               "general_max": round(float(gbest.max()), 3)}
        for t in THRESHOLDS:
            hit = best >= t
            row[f"direct@{t}"] = round(float(hit.mean()), 3)
            row[f"wrong@{t}"] = round(float((hit & ~right).sum() / max(1, hit.sum())), 3)
            row[f"general@{t}"] = round(float((gbest >= t).mean()), 3)
        # the default rule (flywheel.memory.plan): best >= threshold, or >= floor with a lead
        ms = MemorySettings()
        ranked = np.sort(scores, 1)[:, ::-1]
        direct = (ranked[:, 0] >= ms.memory_answer_threshold) | (
            (ranked[:, 0] >= ms.memory_answer_floor) & (ranked[:, 0] - ranked[:, 1] >= ms.memory_answer_margin))
        row["top2_right"] = round(float((np.argsort(-scores, 1)[:, :2] == np.array([i for i, _ in paras])[:, None])
                                        .any(1).mean()), 3)
        row["answered_default"] = round(float(direct.mean()), 3)
        row["answered_wrong_default"] = round(float((direct & ~right).sum() / max(1, direct.sum())), 3)
        out[path.stem] = row
        print(path.stem, json.dumps(row))
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or DEFAULT_SETS)
