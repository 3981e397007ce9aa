"""Benchmark: redaction time on inputs built to make a regex backtrack, against the email pattern
redaction used before (the baseline, run here in the same process on the same input).

Each adversarial input is timed at n and 4n characters: a linear pattern takes ~4x as long on the
longer one, a quadratic one ~16x. Target: `redact('a.' * 20000)` under 0.1 s (the old email
pattern alone took ~3 s there), and no input growing faster than linearly (ratio under 8).
Also reports throughput on ordinary Slack-like text with secrets in it.

    .venv/bin/python bench/redact/run.py [--quick]

The last line is `RESULT {json}`."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from flywheel.redact import redact  # noqa: E402

# The email pattern of trainer/redact.py before this change (commit 4e095af): `\b` lets every
# position in a long run of local-part characters start a scan to the end of the run.
OLD_EMAIL = re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b")

# One unit per pattern family, repeated to length: each is a prefix the pattern could start on.
ADVERSARIAL = {
    "email": "a.", "email_at": "a@", "dashes": "a-", "digits_spaced": "1 ", "digits_dotted": "1.",
    "colons": "a:", "assignment": "token=", "url": "x://a:", "slack": "xoxb-", "openai": "sk-",
    "jwt": "eyJ", "iban": "DE89 ", "pem": "-----BEGIN PRIVATE KEY-----", "pem_body": "abc ",
}
SLACK_TEXT = ("Hi team, the deploy on 2024-01-15 10:30 failed. Logs say postgresql://admin:hunter2@db.internal/app "
              "refused; call me on +49 (0)30 1234567 or mail jane.doe@example.org. Token was "
              "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8, password=s3cret, we are on 3.11.4 with 1500 users.\n")


def timed(fn, text: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    args = parser.parse_args()
    n, repeats = (20_000, 5) if args.quick else (100_000, 9)

    email_input = "a." * 20000
    baseline_s = timed(lambda t: OLD_EMAIL.sub("[EMAIL]", t), email_input, 1)
    ours_s = timed(redact, email_input, repeats)
    print(f"'a.' * 20000: old email pattern alone {baseline_s:.3f} s, redact() now {ours_s:.4f} s")

    # The same 4x growth measured on the old pattern, to show what a quadratic one looks like here.
    old_small, old_large = "a." * (n // 8), "a." * (n // 2)
    t_small = timed(lambda t: OLD_EMAIL.sub("[EMAIL]", t), old_small, 1)
    t_large = timed(lambda t: OLD_EMAIL.sub("[EMAIL]", t), old_large, 1)
    reference = {"chars": [len(old_small), len(old_large)], "seconds": [round(t_small, 4), round(t_large, 4)],
                 "ratio": round(t_large / t_small, 1)}
    print(f"old email pattern {len(old_small)} -> {len(old_large)} chars: x{reference['ratio']} (quadratic is 16)")

    growth = {}
    for name, unit in ADVERSARIAL.items():
        small = unit * (n // len(unit))
        large = unit * (4 * n // len(unit))
        t_small, t_large = timed(redact, small, repeats), timed(redact, large, repeats)
        growth[name] = {"chars": [len(small), len(large)], "seconds": [round(t_small, 5), round(t_large, 5)],
                        "ratio": round(t_large / max(t_small, 1e-9), 2)}
        print(f"{name:14s} {len(small):>7d} chars {t_small:.4f} s  {len(large):>7d} chars {t_large:.4f} s"
              f"  x{growth[name]['ratio']}")

    text = SLACK_TEXT * 200
    t = timed(redact, text, repeats)
    throughput = len(text) / t
    print(f"slack-like text: {len(text)} chars in {t:.4f} s = {throughput / 1e6:.2f} M chars/s")

    worst = max(growth, key=lambda k: growth[k]["ratio"])
    result = {
        "email_a_dot_20000": {"baseline_old_email_s": round(baseline_s, 4), "redact_s": round(ours_s, 5),
                              "speedup": round(baseline_s / max(ours_s, 1e-9), 1), "target_s": 0.1,
                              "met": ours_s < 0.1},
        "growth_4x_input": growth, "baseline_old_email_growth": reference, "worst_ratio": {"input": worst, "ratio": growth[worst]["ratio"],
                                                   "linear_is": 4, "met": growth[worst]["ratio"] < 8},
        "slack_text_chars_per_s": round(throughput), "quick": args.quick,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
