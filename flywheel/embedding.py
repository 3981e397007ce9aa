"""Sentence embeddings for the correction memory: all-MiniLM-L6-v2 through plain transformers
(mean pooling over real tokens, then L2 norm, as sentence-transformers does), on CPU; the model is
a folder or a Hub id, found like the base model (flywheel.basemodel).
sentence-transformers itself is not needed for these three steps."""
from __future__ import annotations

import threading
from functools import lru_cache

import numpy as np

from flywheel.basemodel import ModelLoadError, load_tokenizer, resolve

DIMS = 384


class EmbedderError(RuntimeError):
    """The embedding model is missing or broken; the message says how to get it."""


class Embedder:
    """Text → unit vectors (float32). Thread-safe: one forward pass at a time."""

    def __init__(self, reference: str, max_length: int = 128) -> None:
        """`reference`: a model folder or a Hugging Face Hub id (flywheel.basemodel), e.g.
        sentence-transformers/all-MiniLM-L6-v2."""
        # torch and transformers: seconds to import; the bot imports this module long before it embeds
        import torch
        from transformers import AutoModel

        try:
            folder = resolve(reference).folder
            self.tokenizer = load_tokenizer(folder)
        except ModelLoadError as exc:
            raise EmbedderError(f"no sentence embedder at {reference}: {exc} (the default comes with `make model`, "
                                "or `flywheel model fetch-embedder`)") from exc
        self._torch = torch
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
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


def load_embedder(reference: str) -> Embedder:
    """One embedder per reference (folder or Hub id) and process (loading takes about a
    second). Serialized: two listener threads importing transformers at once can see a
    half-initialized module."""
    with _load_lock:
        return _load(str(reference))


@lru_cache(maxsize=2)
def _load(reference: str) -> Embedder:
    return Embedder(reference)


def to_bytes(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def from_bytes(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)
