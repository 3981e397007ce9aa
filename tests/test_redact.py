"""Redaction of secrets and personal data: what must go (typed placeholders, key names and hosts
kept), what must stay (dates, times, versions, numbers), long inputs, and over-long texts never
reaching redaction at all."""
from __future__ import annotations

from collections import Counter

import pytest

from flywheel.redact import iban_ok, redact
from store.db import get_engine, session_scope
from store.examples import upsert_example
from trainer import dataset
from trainer.dataset import build_snapshot
from trainer.settings import TrainerSettings

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
PEM_BODY = "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\nyJvA0lGyfKrC8f9oYwpFSgDd1Q==\n"


@pytest.mark.parametrize("raw, expected", [
    # International phones, whole (not a tail, not a country code left behind).
    ("call +49 (0)30 1234567 today", "call [PHONE] today"),
    ("Tokyo office +81 3-1234-5678.", "Tokyo office [PHONE]."),
    ("whatsapp +4915112345678", "whatsapp [PHONE]"),
    ("Ph.030 1234567", "Ph.[PHONE]"),
    # Tokens and keys.
    ("pat github_pat_11ABCDEFG0aBcDeFgHiJkLmN_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRS ok",
     "pat [API_KEY] ok"),
    ("classic ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "classic [API_KEY]"),
    ("gitlab glpat-xY12_ab34-CD56ef78GH90", "gitlab [API_KEY]"),
    ("maps AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q ok", "maps [API_KEY] ok"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe [API_KEY]"),
    ("stripe sk_test_51HxYzABCDEF1234567890", "stripe [API_KEY]"),
    ("stripe rk_live_51HxYzABCDEF1234567890", "stripe [API_KEY]"),
    ("stripe pk_live_51HxYzABCDEF1234567890", "stripe [API_KEY]"),
    ("hf hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "hf [API_KEY]"),
    (f"session {JWT} expired", "session [JWT] expired"),
    ("curl -H 'Authorization: Bearer abcdefghijklmnop1234'", "curl -H 'Authorization: Bearer [SECRET]'"),
    # Credentials inside URLs: the credentials go, scheme and host stay.
    ("db postgresql://admin:hunter2@db.internal:5432/app", "db postgresql://[URL_CREDENTIALS]@db.internal:5432/app"),
    ("cache redis://:s3cret-pw@cache.local:6379/0", "cache redis://[URL_CREDENTIALS]@cache.local:6379/0"),
    ("post to https://hooks.slack.com/services/T0123ABCD/B0456EFGH/abcdEFGHijklMNOPqrstUVWX now",
     "post to [SLACK_WEBHOOK] now"),
    # Assignments: the value goes, the key name stays.
    ("password=hunter2", "password=[SECRET]"),
    ("secret: abc123xyz", "secret: [SECRET]"),
    ("?user=bob&token=abcdef123&page=2", "?user=bob&token=[SECRET]&page=2"),
    ("api_key: AbCdEf12345", "api_key: [SECRET]"),
    ('{"password": "correct horse"}', '{"password": "[SECRET]"}'),
    ("export DB_PASSWORD=s3cr3t!", "export DB_PASSWORD=[SECRET]"),
    # A private key without its END line: the header and the base64 block go, the prose after stays.
    (f"my key:\n-----BEGIN RSA PRIVATE KEY-----\n{PEM_BODY}\nThanks for the help",
     "my key:\n[PRIVATE_KEY]\n\nThanks for the help"),
    (f"-----BEGIN EC PRIVATE KEY-----\n{PEM_BODY}-----END EC PRIVATE KEY-----\nthanks",
     "[PRIVATE_KEY]\nthanks"),
    ("-----BEGIN PRIVATE KEY----- MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7", "[PRIVATE_KEY]"),
    # Issue 25.8: keys without labels, Azure, SendGrid, npm, Twilio, passwords in prose, SSNs.
    ("aws wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY here", "aws [AWS_KEY] here"),
    ("DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=" + "Ab3+" * 21 + "xy==;EndpointSuffix=core",
     "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=[SECRET];EndpointSuffix=core"),
    ("https://acme.blob.core.windows.net/c/f.txt?sv=2022-11-02&sig=AbCdEf%2B0123456789xyzQ%3D&se=2026",
     "https://acme.blob.core.windows.net/c/f.txt?sv=2022-11-02&sig=[SECRET]&se=2026"),
    ("sendgrid SG.abcdefghijklmnopqrstuv.ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopq done",
     "sendgrid [API_KEY] done"),
    ("npm npm_abcdefghijklmnopqrstuvwxyz0123456789 ok", "npm [API_KEY] ok"),
    ("twilio SK0123456789abcdef0123456789abcdef ok", "twilio [API_KEY] ok"),
    ("my password is Tr0ub4dor&3, don't tell", "my password is [SECRET], don't tell"),
    ("The wifi password was 'blue-falcon-42'.", "The wifi password was '[SECRET]'."),
    ("her SSN is 123-45-6789.", "her SSN is [SSN]."),
    # IBANs, spaced and compact.
    ("pay to DE89 3704 0044 0532 0130 00 please", "pay to [IBAN] please"),
    ("IBAN GB82WEST12345698765432", "IBAN [IBAN]"),
])
def test_redaction_replaces_secrets_and_personal_data(raw, expected):
    assert redact(raw) == expected


@pytest.mark.parametrize("keep", [
    "the deploy was 2024-01-15 10:30",
    "due 15.01.2024",
    "due 15.01.2024 10:30",
    "at 10:30:45 sharp",
    "upgrade to 3.11.4",
    "in 2024 we had 1500 users",
    "built 2024-01-15T10:30:45Z",
    "Windows 10.0.19045.2965",
    "set max_tokens=512 please",
    "commit 3f9c2a7b8e1d4c6f0a5b9e8d7c6b5a4f3e2d1c0b is merged",  # a git SHA: no upper case
])
def test_redaction_leaves_dates_times_versions_and_numbers(keep):
    assert redact(keep) == keep


def test_a_number_that_fails_the_iban_check_is_not_an_iban():
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE88370400440532013000")
    assert "[IBAN]" not in redact("ref DE88 3704 0044 0532 0130 00")


def test_numbers_that_cannot_be_ssns_are_not_ssns():
    for raw in ("000-12-3456", "666-12-3456", "912-34-5678", "123-00-4567", "123-45-0000"):
        assert "[SSN]" not in redact(f"ref {raw}"), raw


def test_the_placeholder_already_there_is_not_redacted_again():
    counts: Counter = Counter()
    assert redact("GITHUB_TOKEN=ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8 and api_key: [API_KEY]", counts) == \
        "GITHUB_TOKEN=[API_KEY] and api_key: [API_KEY]"
    assert counts == Counter({"API_KEY": 1})


def test_counts_tally_the_new_kinds():
    counts: Counter = Counter()
    redact(f"{JWT} postgresql://u:p4ss@h/db DE89 3704 0044 0532 0130 00 password=hunter2", counts)
    assert counts == Counter({"JWT": 1, "URL_CREDENTIALS": 1, "IBAN": 1, "SECRET": 1})


def test_long_runs_come_back_correct():
    """The input that made the old email pattern quadratic; its timing lives in bench/redact."""
    assert redact("a." * 20000) == "a." * 20000
    assert redact("mail " + "a." * 20000 + "b@example.com now") == "mail [EMAIL] now"
    assert redact("-----BEGIN PRIVATE KEY-----" * 500).count("[PRIVATE_KEY]") == 500


def _settings(tmp_path, **kw) -> TrainerSettings:
    return TrainerSettings(data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", adapters_dir=tmp_path / "ad", **kw)


def test_over_long_texts_are_dropped_before_redaction(sqlite_url, tmp_path, monkeypatch):
    seen: list[int] = []

    def watched(text, counts=None):  # the real redaction, with the length of what it was given
        seen.append(len(text))
        return redact(text, counts)

    monkeypatch.setattr(dataset, "redact", watched)
    with session_scope(get_engine(sqlite_url)) as s:
        upsert_example(s, messages=[{"role": "user", "content": "who to ask?"}], answer="mail bob@corp.example", source="import")
        upsert_example(s, messages=[{"role": "user", "content": "logs?"}],
                       answer="mail eve@corp.example " + "x" * 5000, source="import")
        upsert_example(s, messages=[{"role": "user", "content": "key sk-abcdefghijklmnop1234 " + "y" * 5000}],
                       answer="fine", source="import")
        snap = build_snapshot(s, _settings(tmp_path, eval_fraction=0.0, max_chars=4000))
    assert snap.counts["dropped_too_long"] == 2
    assert seen and max(seen) <= 4000  # the over-long texts never reached redact()
    assert snap.counts["redacted_email"] == 1 and "redacted_api_key" not in snap.counts
