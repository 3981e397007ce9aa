"""Replace secrets and personal data with typed placeholders before anything is written out.
Patterns are ordered from most to least specific so a token is not half-eaten as a phone."""
from __future__ import annotations

import ipaddress
import re
from collections import Counter

_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("PRIVATE_KEY", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL)),
    ("SLACK_TOKEN", re.compile(r"\bx(?:ox[abposre]|app)-[A-Za-z0-9-]{8,}")),
    ("API_KEY", re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}")),
    ("API_KEY", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_\-]{20,}|AIza[0-9A-Za-z_\-]{35})")),
    ("AWS_KEY", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    ("AWS_KEY", re.compile(r"(?i)(?<=aws_secret_access_key)(\s*[=:]\s*)[A-Za-z0-9/+=]{30,64}")),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b")),
    ("CARD", re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")),
    ("IP", re.compile(rf"(?<![\d.]){_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}(?![\d.])")),
    ("IP", re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")),
    ("PHONE", re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{1,4}\)[\s.\-]?)?\d{2,4}(?:[\s.\-]\d{2,5}){1,4}(?!\w)")),
    ("PHONE", re.compile(r"(?<![\w+])\+\d{8,15}(?!\w)")),
]
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _keep(kind: str, found: str) -> bool:
    """Filters the regexes cannot express: Luhn for cards, digit counts and dates for phones."""
    digits = re.sub(r"\D", "", found)
    if kind == "CARD":
        return 13 <= len(digits) <= 19 and luhn_ok(digits)
    if kind == "PHONE":
        return 7 <= len(digits) <= 15 and not _ISO_DATE.match(found.strip())
    if kind == "IP" and ":" in found:
        try:
            ipaddress.IPv6Address(found)
        except ValueError:
            return False
        return any(c.isdigit() for c in found)
    return True


def redact(text: str, counts: Counter | None = None) -> str:
    """The text with every match replaced by [KIND]; `counts` tallies what was replaced."""
    if not text:
        return text
    for kind, pattern in PATTERNS:
        def sub(match: re.Match, kind=kind) -> str:
            found = match.group(0)
            if not _keep(kind, found):
                return found
            if counts is not None:
                counts[kind] += 1
            if kind == "AWS_KEY" and match.groups():
                return f"{match.group(1)}[{kind}]"
            return f"[{kind}]"
        text = pattern.sub(sub, text)
    return text
