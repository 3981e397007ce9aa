"""Serving engines behind one small interface (see base.Backend)."""
from __future__ import annotations

from gateway.backends.base import Backend


def make_backend(settings) -> Backend:
    """The backend the settings name; imports lazily so the vLLM path never loads torch."""
    if settings.backend == "vllm":
        from gateway.backends.vllm import VLLMBackend

        return VLLMBackend(settings)
    from gateway.backends.transformers import TransformersBackend

    return TransformersBackend(settings)


__all__ = ["Backend", "make_backend"]
