"""Passwords in connection URLs never reach a log line, a CLI message or an HTTP answer:
`postgresql://admin:hunter2@db/x` is printed as `postgresql://admin:***@db/x`. One rule, used by
the store's messages and the log renderer (the gateway's error bodies go further and drop URLs
altogether: gateway/errors.py)."""
from __future__ import annotations

import re

# scheme:[//]user:password@ — also the one-slash typo (`postgresql:/u:p@db`), which is exactly
# the kind of URL that ends up quoted in a "malformed database URL" message.
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*:/{0,2}[^\s:/@'\"]*:)(?P<secret>[^\s@'\"/]+)(?=@)")


def mask_url(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***` (works on whole messages too)."""
    return _USERINFO.sub(r"\g<head>***", text) if text and "@" in text else text
