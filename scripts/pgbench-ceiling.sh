#!/usr/bin/env bash
# The database's own ceiling for the agent's transaction: pgbench runs the agent's persist
# statement (read verbatim from src/persist/sql.rs) and COMMIT, in one
# SERIALIZABLE transaction, pipelined (one round trip), with the agent's fencing and parked-key
# checks on, retrying serialization failures (--max-tries). Requests are for USERS users with
# 1-5 distinct catalogue books each, as the benchmark's load.
# With BATCH=B (> 1) it runs the agent's batched statement instead (src/persist/batch/sql.rs):
# B requests of distinct users with 3 books each per transaction.
#   scripts/pgbench-ceiling.sh [SECONDS]   CLIENTS=16 USERS=10000 BATCH=1 AGENT=<release build>
#                                          (DATABASE_URL as test.sh; without AGENT it builds one)
# Prints one line: "pgbench <requests/s> requests/s (<tps> tps, <clients> clients, <retried>
# retried, <failed> failed)".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
secs=${1:-20}
clients=${CLIENTS:-16}
users=${USERS:-10000}
batch=${BATCH:-1}
ensure_postgres
schema=pgbench_$(date +%s)_$$
work=$(mktemp -d)
cleanup() { [ -z "${KEEP_SCRIPTS:-}" ] || cp "$work"/*.sql "$KEEP_SCRIPTS"/; psql "$DATABASE_URL" -qc "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null || true; rm -rf "$work"; }
at_exit cleanup
# AGENT: a build already made (as bench.sh takes it), so a bench run does not begin with a compile.
agent=${AGENT:-target/release/persistence-agent}
[ -n "${AGENT:-}" ] || cargo build --release --locked --bin persistence-agent >&2
DATABASE_SCHEMA=$schema "$agent" migrate --sample-catalogue >/dev/null
psql "$DATABASE_URL" -qc "INSERT INTO $schema.partition_owner (topic, partition, generation)
  SELECT 'bench', p, 1 FROM generate_series(0, 5) p"

# The statement as the agent prepares it, its $n parameters replaced by what pgbench sends.
statement() {
  awk -v name="$1" '$0 ~ "const " name ": &str = r#\"" {on = 1; next} on && /^"#;/ {exit} on' "$2" |
    sed 's/--.*$//'
}
join() { local IFS=,; echo "$*"; }
# The confirmation's timestamp, without colons: pgbench would take ":00" for a variable.
stamp="'2026-01-01T00.00.00.000Z'"
pipeline() {
  echo "\\startpipeline"
  echo "BEGIN ISOLATION LEVEL SERIALIZABLE;"
  echo "SET LOCAL statement_timeout = 5000;"
  echo "SET LOCAL idle_in_transaction_session_timeout = '60s';"
  echo "$1" | tr '\n' ' ' | sed 's/  */ /g'
  echo ";"
  echo "COMMIT;"
  echo "\\endpipeline"
}
single_scripts() {
  sql=$(statement PERSIST_SQL src/persist/sql.rs)
  [ -n "$sql" ] || { echo "PERSIST_SQL not found in src/persist/sql.rs" >&2; exit 1; }
  for n in 1 2 3 4 5; do
    ids=() scores=() breakdowns=() justifications=() reasons=()
    for i in $(seq 1 "$n"); do
      # Slot i draws from its own 20 books, so a request's books are distinct (as the agent's).
      ids+=("format('book-%s', lpad((:b$i + $(( (i - 1) * 20 )))::text, 3, '0'))")
      scores+=("0.5") breakdowns+=("NULL") justifications+=("'Matches the reader''s interest'")
      reasons+=("'[\"theme\",\"depth\"]'")
    done
    declare -A p=(
      [1]="(:rid)::text" [2]="('user-' || :u)" [3]="'bench'" [4]=":part" [5]=":rid"
      [6]="'curious'" [7]="'avanzado'" [8]="'{history}'::text[]" [9]="'aprendizaje'"
      [10]="NULL::jsonb" [11]="0.5" [12]="1200" [13]="'{context,search,scoring,justifier}'::text[]"
      [14]="'{}'::text[]" [15]="ARRAY[$(join "${ids[@]}")]" [16]="ARRAY[$(join "${scores[@]}")]"
      [17]="ARRAY[$(join "${breakdowns[@]}")]::jsonb[]" [18]="ARRAY[$(join "${justifications[@]}")]"
      [19]="ARRAY[$(join "${reasons[@]}")]::jsonb[]" [20]="convert_to('user-' || :u, 'UTF8')"
      [21]="'bench'" [22]=":part" [23]="1" [24]="$stamp" [25]="0"
    )
    body=$sql
    for k in $(seq 25 -1 1); do body=${body//"\$$k"/${p[$k]}}; done
    {
      echo "\\set u random(1, $users)"
      echo "\\set rid random(1, 1000000000000000)"
      echo "\\set part random(0, 5)"
      for i in $(seq 1 "$n"); do echo "\\set b$i random(1, 20)"; done
      pipeline "$body"
    } >"$work/books$n.sql"
    files+=(-f "$work/books$n.sql")
  done
}
# B requests of distinct users (USERS must be prime to 7919), 3 books each from three slots of
# 20 books.
batch_script() {
  sql=$(statement BATCH_SQL src/persist/batch/sql.rs)
  [ -n "$sql" ] || { echo "BATCH_SQL not found in src/persist/batch/sql.rs" >&2; exit 1; }
  local b=$batch k=$((3 * batch))
  local reqs="generate_series(1, $b) g" books="generate_series(0, $k - 1) g"
  # Distinct users and request ids scattered over their indexes, as the agent's batches are
  # (consecutive keys share index pages, and so conflict less than real batches do).
  local user="((:u + g * 7919) % $users + 1)" rids="ARRAY(SELECT md5((:rid::int8 + g)::text) FROM $reqs)"
  fill() { echo "array_fill($1, ARRAY[$2])"; }
  declare -A p=(
    [1]="$rids" [2]="ARRAY(SELECT 'user-' || $user FROM $reqs)"
    [3]="$(fill "'bench'::text" "$b")" [4]="$(fill ":part::int4" "$b")"
    [5]="ARRAY(SELECT (:rid::int8 + g)::int8 FROM $reqs)" [6]="$(fill "'curious'::text" "$b")"
    [7]="$(fill "'avanzado'::text" "$b")" [8]="$(fill "'[\"history\"]'::jsonb" "$b")"
    [9]="$(fill "'aprendizaje'::text" "$b")" [10]="$(fill "NULL::jsonb" "$b")"
    [11]="$(fill "0.5::float8" "$b")" [12]="$(fill "1200::int8" "$b")"
    [13]="$(fill "'[\"context\",\"search\",\"scoring\",\"justifier\"]'::jsonb" "$b")"
    [14]="$(fill "'[]'::jsonb" "$b")" [15]="ARRAY(SELECT convert_to('user-' || $user, 'UTF8') FROM $reqs)"
    [16]="$(fill "'bench'::text" "$b")" [17]="$(fill ":part::int4" "$b")" [18]="$(fill "1::int8" "$b")"
    [19]="ARRAY(SELECT (g / 3 + 1)::int4 FROM $books)"
    [20]="ARRAY(SELECT format('book-%s', lpad(((g % 3) * 20 + 1 + (g * 7 + :bk) % 20)::text, 3, '0')) FROM $books)"
    [21]="$(fill "0.5::float8" "$k")" [22]="$(fill "NULL::jsonb" "$k")"
    [23]="$(fill "'Matches the reader''s interest'::text" "$k")"
    [24]="$(fill "'[\"theme\",\"depth\"]'::jsonb" "$k")"
    [25]="ARRAY(SELECT (g % 3 + 1)::int4 FROM $books)" [26]="$(fill "3" "$b")"
    [27]="$stamp" [28]="0"
  )
  body=$sql
  for n in $(seq 28 -1 1); do body=${body//"\$$n"/${p[$n]}}; done
  {
    echo "\\set u random(0, $((users - batch)))"
    echo "\\set rid random(1, 1000000000000000)"
    echo "\\set part random(0, 5)"
    echo "\\set bk random(0, 19)"
    pipeline "$body"
  } >"$work/batch.sql"
  files+=(-f "$work/batch.sql")
}
files=()
if [ "$batch" -gt 1 ]; then batch_script; else single_scripts; fi
[ -z "${PGBENCH_LOG:-}" ] || exec 3>"$PGBENCH_LOG"
out=$(PGOPTIONS="-c search_path=$schema" pgbench "$DATABASE_URL" -n -M "${PGBENCH_MODE:-prepared}" \
  -c "$clients" -j 2 -T "$secs" --max-tries=100 ${PGBENCH_VERBOSE:+--verbose-errors} "${files[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
[ -z "${PGBENCH_LOG:-}" ] || echo "$out" >&3
tps=$(awk '/^tps = / {print $3}' <<<"$out")
retried=$(awk '/number of transactions retried:/ {print $5; exit}' <<<"$out")
failed=$(awk '/number of failed transactions:/ {print $5; exit}' <<<"$out")
printf 'pgbench %.0f requests/s (%.0f tps of %s, %s clients, %s retried, %s failed, %s s)\n' \
  "$(echo "$tps * $batch" | bc -l)" "$tps" "$batch" "$clients" "${retried:-0}" "${failed:-0}" "$secs"
