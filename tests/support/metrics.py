"""Read Prometheus values from a /metrics page, so tests assert on numbers (before/after
deltas), never on a metric's name merely being exported."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def metric_value(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of sample `name` with exactly these labels at `url` (the /metrics page);
    0.0 when the sample is not there yet (a labelled counter nobody incremented)."""
    text = httpx.get(url, timeout=10).text
    want = labels or {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == want:
                return sample.value
    return 0.0
