"""Replace secrets and personal data with typed placeholders before anything is written out: the
trainer's snapshots and exports (trainer/dataset.py) and the correction memory (flywheel/memory.py,
trainer/importer.py) redact with this one function.

Patterns are ordered from most to least specific so a token is not half-eaten as a phone. Where a
pattern has a group named `v`, only that group is replaced (`password=[SECRET]`, the key name and
a URL's host stay readable). Every pattern runs in linear time: a match may only start where the
character before cannot continue it (a lookbehind, not `\\b`), so a long run such as `'a.' * 20000`
is scanned once instead of once per position; lengths that could run away are bounded. The
dataset builder drops over-long texts (`max_chars`) before they get here."""
from __future__ import annotations

import ipaddress
import re
from collections import Counter

_IPV4_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_PEM_HEAD = r"-----BEGIN (?:[A-Z0-9]+ ){0,4}PRIVATE KEY(?: BLOCK)?-----"
_PEM_END = r"-----END (?:[A-Z0-9]+ ){0,4}PRIVATE KEY(?: BLOCK)?-----"
# One base64 line (or a token of a key pasted onto one line): long, or short and last on its line.
_PEM_BODY = (r"(?:\s*(?:[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])"
             r"|[A-Za-z0-9+/]{1,15}={0,2}(?=[ \t]*(?:\r?\n|$))|(?:Proc-Type|DEK-Info):[^\n]*))*")
_SECRET_KEYS = (r"(?:passw(?:or)?d|pwd|secret(?:[_\-]?key)?|token|api[_\-]?key|access[_\-]?key"
                r"|private[_\-]?key|client[_\-]?secret)")
PATTERNS: list[tuple[str, re.Pattern]] = [
    # Header to END line, any content; the scan stops at the next BEGIN so many headers stay linear.
    ("PRIVATE_KEY", re.compile(_PEM_HEAD + r"(?:(?!-----BEGIN )[\s\S])*?" + _PEM_END)),
    # No END line (cut off, or pasted in part): the header and the base64 block after it.
    ("PRIVATE_KEY", re.compile(_PEM_HEAD + _PEM_BODY)),
    ("JWT", re.compile(r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{8,}\.ey[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*")),
    ("SLACK_WEBHOOK", re.compile(r"https?://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/\-]+")),
    # scheme://user:password@host -> scheme://[URL_CREDENTIALS]@host
    ("URL_CREDENTIALS", re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]{0,30}://"
                                   r"(?P<v>[^\s:/@<>]{0,256}:[^\s/@<>]{1,256})@")),
    ("SLACK_TOKEN", re.compile(r"(?<![A-Za-z0-9\-])x(?:ox[abposre]|app)-[A-Za-z0-9-]{8,}")),
    ("API_KEY", re.compile(r"(?<![A-Za-z0-9_\-])sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{16,}")),
    ("API_KEY", re.compile(r"(?<![A-Za-z0-9_\-])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,}"
                           r"|glpat-[A-Za-z0-9_\-]{20,}|AIza[0-9A-Za-z_\-]{35}|hf_[A-Za-z0-9]{30,})")),
    # Stripe-style keys: secret, restricted and publishable, live and test.
    ("API_KEY", re.compile(r"(?<![A-Za-z0-9_])(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}")),
    ("API_KEY", re.compile(r"(?<![A-Za-z0-9_\-.])SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}(?![A-Za-z0-9_\-])")),  # SendGrid
    ("API_KEY", re.compile(r"(?<![A-Za-z0-9_])npm_[A-Za-z0-9]{36}(?![A-Za-z0-9])")),  # npm access tokens
    ("API_KEY", re.compile(r"(?<![A-Za-z0-9])SK[0-9a-fA-F]{32}(?![A-Za-z0-9])")),  # Twilio API key SIDs
    # Azure: a storage account key in a connection string, and a SAS token's signature.
    ("SECRET", re.compile(r"(?i)AccountKey=(?P<v>[A-Za-z0-9+/]{86}==)")),
    ("SECRET", re.compile(r"(?i)(?<=[?&])sig=(?P<v>[A-Za-z0-9%+/=]{16,})")),
    ("AWS_KEY", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}(?![A-Za-z0-9])")),
    # An AWS secret access key without its label: 40 base64 characters, mixed case and digits
    # (checked in _keep, so git SHAs and plain words stay).
    ("AWS_KEY", re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")),
    ("AWS_KEY", re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*(?P<v>[A-Za-z0-9/+=]{30,64})")),
    ("SECRET", re.compile(r"(?i)(?<![A-Za-z0-9])bearer[ \t]+(?P<v>[A-Za-z0-9._~+/\-]{16,}=*)")),
    # password=..., "api_key": "...", DB_PASSWORD: ...: the value goes, the key name stays. A key
    # starts after a space, quote, bracket or separator, so `token=token=...` is not rescanned.
    ("SECRET", re.compile(r"(?i)(?<![^\s\"'{(\[,;&?])[\w\-]{0,60}?" + _SECRET_KEYS
                          + r"[\"']?[ \t]*[:=][ \t]*[\"']?"
                          r"(?P<v>(?<=[\"'])[^\"'\n]{3,}(?=[\"'])|(?<![\"'])[^\s\"',;&<>\[\]{}()][^\s\"',;&<>]{2,})")),
    # "my password is hunter2": the password said in prose (trailing punctuation stays).
    ("SECRET", re.compile(r"(?i)(?<![A-Za-z])(?:password|passcode|passphrase|pin)[ \t]+(?:is|was)[ \t]+"
                          r"[\"'“]?(?P<v>[^\s\"'”]{0,200}[^\s\"'”.,;:!?)])")),
    # US social security numbers (area 000, 666 and 9xx, group 00 and serial 0000 do not exist).
    ("SSN", re.compile(r"(?<![\d\-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d\-])")),
    # A local part starts where no local-part character precedes it: linear on 'a.' * 20000.
    ("EMAIL", re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b")),
    ("IBAN", re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")),
    ("CARD", re.compile(r"(?<![\d+])(?:\d[ -]?){12,18}\d(?!\d)")),  # not after "+": a phone
    ("IP", re.compile(rf"(?<![\d.]){_IPV4_OCTET}(?:\.{_IPV4_OCTET}){{3}}(?![\d.])")),
    ("IP", re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")),
    # +49 (0)30 1234567, +81 3-1234-5678, (555) 123-4567. Groups need a separator (no ambiguous
    # splits); never right after `<digit>.` or `<digit>/` (the tail of a version or a build number).
    ("PHONE", re.compile(r"(?<![\w+])(?<!\d[./])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{1,5}\)[\s.\-]?)?"
                         r"\d{1,5}(?:[\s.\-]\d{2,8}){1,5}(?!\w)")),
    ("PHONE", re.compile(r"(?<![\w+])\+\d{8,15}(?!\w)")),
]
# Dates a phone pattern can reach: 2024-01-15 and 15.01.2024 (day, month, year checked).
_DATE = re.compile(r"(?<!\d)(?:(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
                   r"|(?:0?[1-9]|[12]\d|3[01])\.(?:0?[1-9]|1[0-2])\.(?:19|20)\d\d)(?!\d)")
# Countries that issue IBANs (ISO 13616 registry).
_IBAN_COUNTRIES = frozenset(
    "AD AE AL AT AZ BA BE BG BH BI BR BY CH CR CY CZ DE DJ DK DO EE EG ES FI FK FO FR GB GE GI GL GR "
    "GT HR HU IE IL IQ IS IT JO KW KZ LB LC LI LT LU LV LY MC MD ME MK MN MR MT MU NI NL NO OM PK PL "
    "PS PT QA RO RS RU SA SC SD SE SI SK SM SO ST SV TL TN TR UA VA VG XK YE".split())


def luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616 check digits: the rearranged number mod 97 is 1."""
    iban = iban.replace(" ", "")
    if not 15 <= len(iban) <= 34 or iban[:2] not in _IBAN_COUNTRIES:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _keep(kind: str, found: str) -> bool:
    """Filters the regexes cannot express: Luhn for cards, mod 97 for IBANs, digit counts and
    dates for phones."""
    if kind == "AWS_KEY" and len(found) == 40:
        return any(c.isupper() for c in found) and any(c.islower() for c in found) \
            and any(c.isdigit() for c in found)
    if kind == "CARD":
        digits = re.sub(r"\D", "", found)
        return 13 <= len(digits) <= 19 and luhn_ok(digits)
    if kind == "IBAN":
        return iban_ok(found)
    if kind == "PHONE":
        digits = re.sub(r"\D", "", found)
        return 7 <= len(digits) <= 15 and not _DATE.search(found)
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
            if "v" in match.re.groupindex:
                start, end = match.span("v")
                offset = match.start()
                return f"{found[:start - offset]}[{kind}]{found[end - offset:]}"
            return f"[{kind}]"
        text = pattern.sub(sub, text)
    return text
