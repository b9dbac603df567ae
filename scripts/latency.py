#!/usr/bin/env python3
"""Produce-to-result latency: for every JSON request on the input topic, the time from its
Kafka timestamp (set by the producer) to the Kafka timestamp of its result event.

    scripts/latency.py BROKERS INPUT_TOPIC RESULTS_TOPIC COUNT

Reads both topics from the beginning (its own throwaway group, nothing committed) until COUNT
results have arrived or 60 s pass without a new one. Prints one line:
"latency p50 <ms> ms, p95 <ms> ms, p99 <ms> ms, max <ms> ms (<n> requests)". With
LATENCY_RAW=<file>, also writes each matched request's Kafka timestamp and latency (ms), one
per line, for scripts/timeline.py.
"""
import json
import os
import sys
import time
import uuid

from confluent_kafka import Consumer


def read(brokers, topic, key, count):
    c = Consumer({"bootstrap.servers": brokers, "group.id": f"latency-{uuid.uuid4()}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([topic])
    seen, last = {}, time.monotonic()
    try:
        while len(seen) < count and time.monotonic() - last < 60:
            msg = c.poll(1.0)
            if msg is None or msg.error():
                continue
            try:
                rid = key(json.loads(msg.value()))
            except (ValueError, KeyError, TypeError):
                continue
            seen.setdefault(rid, msg.timestamp()[1])
            last = time.monotonic()
    finally:
        c.close()
    return seen


def summary(lat, noun):
    """p50, p95, p99 and max of sorted latencies in ms (also scripts/broker-latency.py's)."""
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return (f"p50 {pick(0.50):.0f} ms, p95 {pick(0.95):.0f} ms, p99 {pick(0.99):.0f} ms, "
            f"max {lat[-1]:.0f} ms ({len(lat)} {noun})")


def main():
    brokers, input_topic, results_topic, count = sys.argv[1:5]
    count = int(count)
    sent = read(brokers, input_topic, lambda v: v["metadata"]["requestId"], count)
    done = read(brokers, results_topic, lambda v: v["requestId"], count)
    matched = [(sent[r], done[r] - sent[r]) for r in done if r in sent]
    lat = sorted(ms for _, ms in matched)
    if os.environ.get("LATENCY_RAW"):
        with open(os.environ["LATENCY_RAW"], "w") as f:
            f.writelines(f"{t} {ms}\n" for t, ms in matched)
    if not lat:
        sys.exit("latency: no request matched a result")
    if len(lat) < count:
        # A broker that dropped the oldest records (the mock cluster keeps 5 MB a partition) or
        # lost some leaves requests out: the figures are of the rest only.
        print(f"latency: only {len(lat)} of {count} requests matched a result", file=sys.stderr)
    print(f"latency {summary(lat, 'requests')}")


if __name__ == "__main__":
    main()
