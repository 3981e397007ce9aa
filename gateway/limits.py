"""Per-request limits, the same for every backend: the completion budget is clamped to
FLYWHEEL_MAX_NEW_TOKENS (a client asking for 4000 tokens gets at most the cap, finish_reason
"length"), and the knobs that multiply one request's work are refused unless enabled."""
from __future__ import annotations

from gateway.errors import bad_request


def apply_limits(req, settings) -> None:
    """Refuse `n` above FLYWHEEL_MAX_CHOICES and logprobs unless FLYWHEEL_ALLOW_LOGPROBS; then set
    `max_tokens` to min(requested, cap), so backends read one clamped number."""
    if req.n > settings.max_choices:
        raise bad_request(f"n={req.n} is not allowed here (at most {settings.max_choices} choice per request)",
                          code="unsupported_parameter", param="n")
    if req.wants_logprobs() and not settings.allow_logprobs:
        raise bad_request("logprobs are not enabled on this gateway", code="unsupported_parameter",
                          param="logprobs")
    cap = settings.max_new_tokens
    req.max_tokens = min(req.token_limit() or cap, cap)
    if hasattr(req, "max_completion_tokens"):
        req.max_completion_tokens = None
