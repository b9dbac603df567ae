#!/usr/bin/env bash
# The test command: runs the whole suite against a real PostgreSQL and a real Kafka-protocol
# broker. Uses DATABASE_URL / KAFKA_BROKERS when set; otherwise the local PostgreSQL on
# 127.0.0.1:5432 (or a throwaway cluster) and a tansu broker it starts on 127.0.0.1:9092.
# Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
ensure_kafka
ensure_python_deps
echo "test.sh: DATABASE_URL=${DATABASE_URL%%\?*} KAFKA_BROKERS=$KAFKA_BROKERS"
# Two test threads: each test runs an agent and its own transactions on a 2-core machine.
log=$(mktemp)
set +e
cargo test --locked "$@" -- --test-threads="${TEST_THREADS:-2}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 2; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
