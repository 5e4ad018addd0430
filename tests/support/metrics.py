"""Prometheus /metrics of our processes, parsed with prometheus_client's parser."""
from __future__ import annotations

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """GET /metrics and parse it with prometheus_client's parser: {(sample name, labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, lab), v in samples.items()
               if n == name and all(dict(lab).get(k) == want for k, want in labels.items()))


def metric_delta(before: dict, after: dict, name: str, **labels: str) -> float:
    """How much ``name`` (summed over samples matching ``labels``) moved between two scrapes.

    Counters are shared by every test that runs against the session's processes: assert
    the change around an action, never the absolute value.
    """
    return metric(after, name, **labels) - metric(before, name, **labels)
