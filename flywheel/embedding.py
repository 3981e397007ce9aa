"""Sentence embeddings for the correction memory: all-MiniLM-L6-v2 through plain transformers
(mean pooling over real tokens, then L2 norm, as sentence-transformers does), on CPU, offline.
sentence-transformers itself is not needed for these three steps."""
from __future__ import annotations

import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

DIMS = 384


class EmbedderError(RuntimeError):
    """The embedding model is missing or broken; the message says how to get it."""


class Embedder:
    """Text → unit vectors (float32). Thread-safe: one forward pass at a time."""

    def __init__(self, model_dir: Path, max_length: int = 128) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from flywheel.modelfiles import read_marker

        model_dir = Path(model_dir)
        if read_marker(model_dir) is None:
            raise EmbedderError(f"no sentence embedder in {model_dir}; run `make model` "
                                "(or `flywheel model fetch-embedder`)")
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
        self.max_length = max_length
        self.dims = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        torch = self._torch
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dims), dtype=np.float32)

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


_load_lock = threading.Lock()


def load_embedder(model_dir: str) -> Embedder:
    """One embedder per directory and process (loading takes about a second). Serialized: two
    listener threads importing transformers at once can see a half-initialized module."""
    with _load_lock:
        return _load(str(model_dir))


@lru_cache(maxsize=2)
def _load(model_dir: str) -> Embedder:
    return Embedder(Path(model_dir))


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def from_bytes(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)
