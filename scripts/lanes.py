#!/usr/bin/env python3
"""What the agent's database sessions are doing, sampled from pg_stat_activity during a run.

    python3 scripts/lanes.py [SECONDS] [DATABASE_URL]    (defaults: 6, $DATABASE_URL, else the
                                                          local server on 5432; LANES_EVERY_MS=3
                                                          between samples)

Waits (up to 5 minutes) for an agent session (application_name persistence-agent) to run the
persist statement, then samples every few milliseconds for SECONDS and prints how often 0, 1, 2, ...
agent sessions were busy (not idle) at once, and the most frequent states: state, wait event,
and the start of the statement (BEGIN, the persist statement `WITH ...`, COMMIT).

Start it just before `RUNS=batched scripts/bench.sh`. `BATCH_CONCURRENCY` sessions busy most
of the time, "active" with no wait event, means the batch lanes keep the database working and
what is left to gain is CPU for PostgreSQL. Fewer busy sessions for long means lanes sit
between batches: the workers (`WORKERS`, `MAX_IN_FLIGHT`) do not feed them. Many waits on the
WAL mean the lanes contend at COMMIT. It counts every session of that application name on the
server (other agents, the retry consumer), and sees their state only as a superuser, the agents'
role or a member of pg_read_all_stats. Its queries cost the run CPU: runs with it sampling wrote
5-10 % less (BENCHMARKS.md). Needs psycopg2 (`pip install psycopg2-binary`).
"""
import collections
import os
import sys
import time

try:
    import psycopg2
except ImportError:
    sys.exit("lanes.py needs psycopg2: pip install psycopg2-binary")

QUERY = r"""SELECT state, coalesce(wait_event_type || ':' || wait_event, '-'),
                  left(ltrim(query, E' \n\t'), 12)
           FROM pg_stat_activity
           WHERE application_name = 'persistence-agent' AND state <> 'idle'
             AND pid <> pg_backend_pid()"""


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    # The local server, as scripts/lib.sh falls back to (not its throwaway cluster).
    url = sys.argv[2] if len(sys.argv) > 2 else os.environ.get(
        "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    every = float(os.environ.get("LANES_EVERY_MS", "3")) / 1000
    conn = psycopg2.connect(url, application_name="lanes.py")
    conn.autocommit = True
    cur = conn.cursor()
    give_up = time.monotonic() + 300
    while True:
        cur.execute(QUERY)
        # The persist statement (batched or not), not the claims of the group join.
        if any(r[0] == "active" and r[2].startswith("WITH") for r in cur.fetchall()):
            break
        if time.monotonic() > give_up:
            sys.exit("lanes.py: no agent session ran a statement within 5 minutes")
        time.sleep(0.01)
    busy, states, samples = collections.Counter(), collections.Counter(), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        cur.execute(QUERY)
        rows = cur.fetchall()
        samples += 1
        busy[len(rows)] += 1
        states.update((r[0], r[1], " ".join(r[2].split())) for r in rows)
        time.sleep(every)
    print(f"{samples} samples over {seconds:g} s")
    for n, count in sorted(busy.items()):
        print(f"  {n} busy sessions: {100 * count / samples:5.1f} % of samples")
    total = sum(states.values()) or 1
    for (state, wait, stmt), count in states.most_common(10):
        print(f"  {100 * count / total:5.1f} %  {state:<20} {wait:<28} {stmt}")


if __name__ == "__main__":
    main()
