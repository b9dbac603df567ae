#!/usr/bin/env python3
"""Where a request's time goes inside the agent, from its /metrics (Prometheus text on stdin):
its transaction attempts (batched or single, from the wait for a pooled connection to COMMIT)
against the whole span from the request's Kafka timestamp to its outcome. Histograms give
means exactly and quantiles only as the bucket that holds them.

    curl -s http://AGENT/metrics | scripts/stages.py

Prints one line: "stages: transaction mean <ms> ms, p99 <lo>-<hi> ms (<n>); message to outcome
mean <ms> ms, p99 <lo>-<hi> ms (<n>); mean batch <b>".
"""
import math
import re
import sys

NS = "persistence_agent_"
LINE = re.compile(r'^(\w+)(?:\{([^}]*)\})?\s+(\S+)')


def histograms(text):
    """name -> {"buckets": {le: count}, "sum": s, "count": n}, summed over other labels."""
    out = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or not m.group(1).startswith(NS):
            continue
        name, labels, value = m.group(1)[len(NS):], m.group(2) or "", float(m.group(3))
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix):
                h = out.setdefault(name[: -len(suffix)], {"buckets": {}, "sum": 0.0, "count": 0.0})
                if suffix == "_bucket":
                    le = float(re.search(r'le="([^"]+)"', labels).group(1))
                    h["buckets"][le] = h["buckets"].get(le, 0.0) + value
                else:
                    h[suffix[1:]] += value
    return out


def quantile_bucket(h, q):
    """The (lower, upper] bounds, in seconds, of the bucket holding quantile q."""
    lower = 0.0
    for le in sorted(h["buckets"]):
        if h["buckets"][le] >= q * h["count"]:
            return lower, le
        lower = le
    return lower, math.inf


def describe(h, scale=1000.0):
    if not h or h["count"] == 0:
        return "none"
    lo, hi = quantile_bucket(h, 0.99)
    hi = "inf" if hi == math.inf else f"{hi * scale:.10g}"
    return (f"mean {h['sum'] / h['count'] * scale:.1f} ms, p99 {lo * scale:.10g}-{hi} ms "
            f"({h['count']:.0f})")


def main():
    hs = histograms(sys.stdin.read())
    batch = hs.get("batch_requests")
    size = f"{batch['sum'] / batch['count']:.1f}" if batch and batch["count"] else "none"
    print(f"stages: transaction {describe(hs.get('transaction_duration_seconds'))}; "
          f"message to outcome {describe(hs.get('end_to_end_latency_seconds'))}; "
          f"mean batch {size}")


if __name__ == "__main__":
    main()
