"""Server-sent events as clients get them (`data: {json}\\n\\n`, ending `data: [DONE]\\n\\n`), and the
cheap per-chunk relabelling of vLLM's stream: most chunks only need their `model` renamed, which
a bytes replace does in well under a microsecond instead of a JSON decode and encode."""
from __future__ import annotations

import orjson

DONE = b"data: [DONE]\n\n"
_MODEL_KEY = b'"model":'


def event(chunk: dict) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class StreamError(Exception):
    """vLLM reported an error inside its stream (the message is vLLM's, for the log only)."""


class Relabel:
    """Turns one vLLM stream chunk (the JSON after `data:`) into the client's SSE event with
    `model` set to our label, and returns the chunk's token usage (None when it has none).

    The bytes replace is safe because in valid JSON a quote inside a string is always escaped,
    so `"model":` (no backslash) can only be an object key, and the match is taken only when
    the chunk holds exactly one such key, the top-level one every chunk carries, with the exact
    value we sent (its JSON encoding includes both quotes: no prefix matches). A chunk holding
    the token `"usage"` or `"error"` anywhere, or written some other way (spaces, escapes), is
    decoded, checked and re-encoded, as every chunk used to be."""

    def __init__(self, upstream: str, label: str) -> None:
        self.label = label
        self.old = _MODEL_KEY + orjson.dumps(upstream)
        self.new = _MODEL_KEY + orjson.dumps(label)

    def __call__(self, data: bytes) -> tuple[bytes, dict | None]:
        if (self.old in data and data.count(_MODEL_KEY) == 1 and b'"usage"' not in data
                and b'"error"' not in data):
            return b"data: " + data.replace(self.old, self.new, 1) + b"\n\n", None
        chunk = orjson.loads(data)
        if "error" in chunk and "choices" not in chunk:
            err = chunk["error"]
            raise StreamError(str(err.get("message") if isinstance(err, dict) else err))
        chunk["model"] = self.label
        return event(chunk), chunk.get("usage") or None
