#!/usr/bin/env bash
# The fault suite's long variant: every tests/fault_*.rs scenario with FAULTS_REQUESTS requests
# (5000 unless set; `scripts/test.sh` runs the same tests with 600), one test at a time, then one
# table: scenario, requests published, persisted, dead-lettered, duplicates and lost (both must
# be 0), wrong outcomes, repeats of at-least-once deliveries, time to recover and exit codes.
#   scripts/faults.sh [TEST-FILTER]      DATABASE_URL / KAFKA_BROKERS as scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
ensure_kafka
export FAULTS_REQUESTS=${FAULTS_REQUESTS:-5000}
export FAULTS_REPORT
FAULTS_REPORT=$(mktemp)
at_exit "rm -f '$FAULTS_REPORT'"
tests=$(ls tests/fault_*.rs | xargs -n1 basename | sed 's/\.rs$//')
args=()
for t in $tests; do args+=(--test "$t"); done
echo "faults.sh: $FAULTS_REQUESTS requests per scenario; DATABASE_URL=${DATABASE_URL%%\?*} KAFKA_BROKERS=$KAFKA_BROKERS"
set +e
cargo test --locked --no-fail-fast "${args[@]}" -- --test-threads=1 "$@" 2>&1 |
  grep -E '^(test |fault report|fault seed|test result|thread .* panicked)'
status=${PIPESTATUS[0]}
set -e
python3 - "$FAULTS_REPORT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = ["scenario", "published", "persisted", "dead_lettered", "duplicates", "lost", "wrong",
        "dead_letter_repeats", "confirmation_repeats", "recover_s", "exit_codes"]
head = ["scenario", "published", "persisted", "dead-lettered", "duplicates", "lost", "wrong",
        "DLQ repeats", "confirm repeats", "recover (s)", "exit codes"]
print()
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for r in rows:
    cells = [r[c] for c in cols]
    cells[-1] = " ".join(str(c) for c in cells[-1]) or "-"
    print("| " + " | ".join(str(c) for c in cells) + " |")
EOF
exit "$status"
