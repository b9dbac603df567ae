#!/usr/bin/env python3
"""The agent's threads over a window, for scripts/bench.sh (THREADS=1): context switches per
request and cores, by thread name. An unbatched request costs the agent about four times what
a batched one does, and a profile puts a quarter of it in the kernel switching threads
(BENCHMARKS.md, tenth session): this says which threads sleep and wake, and how often.

  threads.py snap FILE PID...      record each thread's name, CPU time and switch counts
  threads.py diff A B REQUESTS     per request settled between snapshots A and B: voluntary
                                   (the thread slept: a wait on a lock, a channel, a socket)
                                   and involuntary switches (preempted, as by PostgreSQL's
                                   backends), and the cores each kind of thread used

Threads are grouped by name: tokio's runtime workers and its blocking threads (the consumer's
poll loop among them) are all "tokio-rt-worker"; librdkafka's are "rdk:...". A thread born
inside the window counts all its time; one that ended is not seen."""
import json
import os
import sys
import time
from collections import defaultdict

TICKS = os.sysconf("SC_CLK_TCK")


def thread(task_dir):
    """[name, utime + stime ticks, voluntary, involuntary switches], or None once gone."""
    try:
        with open(f"{task_dir}/stat") as f:
            text = f.read()
        with open(f"{task_dir}/status") as f:
            status = dict(line.split(":\t", 1) for line in f if ":\t" in line)
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return [text[text.index("(") + 1 : text.rindex(")")], int(fields[11]) + int(fields[12]),
            int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"])]


def snap(path, pids):
    threads = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            if t := thread(f"/proc/{pid}/task/{tid}"):
                threads[tid] = t
    with open(path, "w") as f:
        json.dump({"time": time.time(), "threads": threads}, f)


def diff(a_path, b_path, requests):
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    secs = b["time"] - a["time"]
    if requests <= 0 or secs <= 0:
        sys.exit("threads.py: no requests or no time between the snapshots")
    by_name = defaultdict(lambda: [0, 0, 0, 0])  # threads, ticks, voluntary, involuntary
    for tid, (name, ticks, vol, invol) in b["threads"].items():
        _, ticks0, vol0, invol0 = a["threads"].get(tid, [name, 0, 0, 0])
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
    if len(sys.argv) >= 3 and sys.argv[1] == "snap":
        snap(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) == 5 and sys.argv[1] == "diff":
        diff(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
