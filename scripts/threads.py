#!/usr/bin/env python3
"""The agent's threads over a window, for scripts/bench.sh (THREADS=1): context switches per
request and cores, by thread name, so a change to how the agent's threads sleep and wake can
be seen in figures rather than guessed at from a profile.

  threads.py diff A B REQUESTS     per request settled between snapshots A and B, taken with
                                   `cores.py snap FILE PID...` (same process, same moment as
                                   the cores): voluntary switches (the thread slept: on a lock,
                                   a channel, a socket) and involuntary ones (preempted, as by
                                   PostgreSQL's backends), and the cores each kind of thread used

Threads are grouped by name, as the kernel keeps it (15 characters: "producer pollin" is
rust-rdkafka's "producer polling" thread); "xN" counts those alive at snapshot B over every
agent given. tokio's runtime workers and its blocking threads (the consumer's poll loop among
them) are all "tokio-rt-worker"; librdkafka's are "rdk:...". A thread born inside the window
counts all its time; one that ended inside it is not seen (tokio ends an idle blocking thread
after 10 s)."""
import os
import sys
from collections import defaultdict

import cores

TICKS = os.sysconf("SC_CLK_TCK")


def tasks(pids):
    """Every thread of PIDS, keyed by tid and start time (a reused tid is another thread):
    [name, utime + stime ticks, voluntary, involuntary switches]."""
    threads = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            task = f"{pid}/task/{tid}"
            s = cores.stat(task)
            try:
                with open(f"/proc/{task}/status") as f:
                    status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
            except OSError:
                continue
            if s:
                threads[f"{tid}@{s[2]}"] = [s[0], s[1], int(status["voluntary_ctxt_switches"]),
                                            int(status["nonvoluntary_ctxt_switches"])]
    return threads


def diff(a_path, b_path, requests):
    a, b = cores.load(a_path), cores.load(b_path)
    if not a.get("threads") or not b.get("threads"):
        sys.exit("threads.py: no threads in a snapshot (take both with cores.py snap FILE PID...)")
    secs = b["time"] - a["time"]
    if requests <= 0 or secs <= 0:
        sys.exit("threads.py: no requests or no time between the snapshots")
    by_name = defaultdict(lambda: [0, 0, 0, 0])  # threads, ticks, voluntary, involuntary
    for key, (name, ticks, vol, invol) in b["threads"].items():
        _, ticks0, vol0, invol0 = a["threads"].get(key, [name, 0, 0, 0])
        g = by_name[name]
        g[0] += 1
        g[1] += ticks - ticks0
        g[2] += vol - vol0
        g[3] += invol - invol0
    total = [sum(g[i] for g in by_name.values()) for i in range(4)]
    parts = []
    # Busiest first; threads that hardly ran are left out of the line but not of the total.
    for name, (n, ticks, vol, invol) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        if (vol + invol) / requests < 0.05 and ticks / TICKS / secs < 0.005:
            continue
        parts.append(f"{name} x{n} {vol / requests:.2f} / {invol / requests:.2f}, "
                     f"{ticks / TICKS / secs:.3f} cores")
    parts.append(f"all {total[2] / requests:.2f} / {total[3] / requests:.2f}, "
                 f"{total[1] / TICKS / secs:.3f} cores")
    print("threads (switches a request, voluntary / involuntary; cores): " + "; ".join(parts))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "diff" and sys.argv[4].isdigit():
        diff(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
