#!/usr/bin/env python3
"""The broker's own latency, one hop, for comparison with the agent's produce-to-result
latency, which holds one such hop (request in; a result's timestamp is taken when the agent
produces it): RATE records/s of 1 kB for SECONDS s into a 6-partition topic, produced as
the benchmark's load is (linger.ms=5), and consumed with the agent's fetch wait
(KAFKA_CONFIG_fetch.wait.max.ms, librdkafka's 500 ms when unset); each record's latency is its
arrival at the consumer minus its Kafka timestamp.

    scripts/broker-latency.py BROKERS RATE SECONDS [TOPIC]

TOPIC: a 6-partition topic that exists already (for a broker without CreateTopics, such as
librdkafka's mock cluster); else a new one is created.

Prints one line: "broker only: p50 <ms> ms, p95 <ms> ms, p99 <ms> ms, max <ms> ms (<n> records)".
"""
import os
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from latency import summary


def main():
    brokers, rate, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if len(sys.argv) > 4:
        topic = sys.argv[4]
    else:
        topic = "bench.broker-latency." + uuid.uuid4().hex[:8]
        admin = AdminClient({"bootstrap.servers": brokers})
        admin.create_topics([NewTopic(topic, 6, 1)])[topic].result()
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": topic,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": int(os.environ.get("KAFKA_CONFIG_fetch.wait.max.ms", "500")),
    })
    consumer.subscribe([topic])
    joined = time.time()
    while not consumer.assignment():
        if time.time() - joined > 60:
            sys.exit("broker-latency: no partitions assigned within 60 s")
        consumer.poll(0.1)
    n, latencies = rate * secs, []

    def consume():
        last = time.time()
        while len(latencies) < n and time.time() - last < 30:
            m = consumer.poll(0.5)
            if m is None or m.error():
                continue
            latencies.append(time.time() * 1000 - m.timestamp()[1])
            last = time.time()

    reader = threading.Thread(target=consume)
    reader.start()
    # The agent's load generator's linger (bench.sh's LATENCY_LINGER_MS), so the hop compares.
    linger = int(os.environ.get("LATENCY_LINGER_MS", "5"))
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": linger})
    start = time.time()
    for i in range(n):
        while time.time() < start + i / rate:
            time.sleep(0.0005)
        producer.produce(topic, b"x" * 1000, key=str(i % 10000).encode())
        producer.poll(0)
    producer.flush()
    reader.join()
    consumer.close()
    if not latencies:
        sys.exit("broker-latency: no record arrived")
    print(f"broker only: {summary(sorted(latencies), 'records')}")


if __name__ == "__main__":
    main()
