"""Exact and near-duplicate detection. Exact: a normalized-text hash. Near: MinHash over word
bigrams with an LSH index (datasketch), so finding candidates stays sub-quadratic."""
from __future__ import annotations

import hashlib
import re

from datasketch import MinHash, MinHashLSH

from trainer.clean import normalize_for_hash


def exact_key(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(normalize_for_hash(p or "") for p in parts).encode()).hexdigest()


def shingles(text: str, n: int = 2) -> set[str]:
    """Word bigrams of the normalized text (one inserted word barely moves the Jaccard, one
    changed content word in a short question does); very short texts use character 4-grams."""
    words = normalize_for_hash(text).split()
    if len(words) >= n + 2:
        return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}
    flat = re.sub(r"\s+", " ", " ".join(words))
    return {flat[i:i + 4] for i in range(max(1, len(flat) - 3))}


def minhash(text: str, num_perm: int = 128) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


class NearDupIndex:
    """Add texts under keys; `matches(text)` gives keys whose estimated Jaccard ≥ threshold."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128):
        self.threshold, self.num_perm = threshold, num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._hashes: dict[str, MinHash] = {}

    def add(self, key: str, text: str) -> None:
        if key in self._hashes:
            return
        m = minhash(text, self.num_perm)
        self._lsh.insert(key, m)
        self._hashes[key] = m

    def matches(self, text: str) -> list[str]:
        m = minhash(text, self.num_perm)
        found = self._lsh.query(m)
        # LSH gives candidates; confirm with the estimated Jaccard so the threshold is honoured.
        return sorted(k for k in found if self._hashes[k].jaccard(m) >= self.threshold)

    def __len__(self) -> int:
        return len(self._hashes)
