#!/usr/bin/env python3
"""A latency run's tail, half a second at a time: when the slow requests were produced, and what
the agent was doing then.

    python3 scripts/timeline.py sample METRICS_URL SECONDS OUT [AGENT_PID...]  (while the load runs)
    python3 scripts/timeline.py report OUT LATENCIES          (after: LATENCIES from latency.py)

`sample` reads the agent's /metrics every 100 ms (TIMELINE_EVERY_MS) for SECONDS, in-process
(no fork per sample: a `curl` loop every 50 ms cost the run enough cores to lengthen the very
tail it was to explain), and writes one line per sample: wall-clock ms, messages in flight on
the main consumer, requests settled by transactions so far, batches committed so far, and from
/proc the machine's idle and total CPU time, its runnable threads, and its disks' writes and
milliseconds spent writing so far (the runnable threads count the sampler itself), and the CPU
time so far of the broker, the agent (AGENT_PIDs) and PostgreSQL as scripts/cores.py groups
them (every process of those names on the machine), looked for again every second (one
that started and ended between two looks is not counted).

`report` bins by the requests' Kafka timestamps (the same wall clock, on one machine) and
prints, for each half second: requests produced, their p50 / p99 / max latency, and from the
samples in that half second the messages in flight (mean and max), requests settled per
second (written or found in the ledger), batches committed per second and their mean size,
the cores left idle (iowait counted idle), the runnable threads, and milliseconds per disk
write (a bin's total writing time over its writes; `-` with none, or no disk recognised), and
the cores the broker, the agent and PostgreSQL used. Cores come from 100 ms samples of CPU time
counted in ticks (10 ms): good to about 0.1 core for the idle ones, 0.02 per process a bin.
In-flight swelling while batches get fewer and larger, at the same requests per second, points
at slower transactions (the lanes full); in-flight falling while latency grows, at work not
reaching the agent (the broker, the consumer); the processes' cores, at who took the machine.
"""
import os
import re
import sys
import time
import urllib.request

import cores

IN_FLIGHT = re.compile(r'^persistence_agent_in_flight_messages\{consumer="main"\} (\S+)$', re.M)
# Attempts that settled a request (written, or found in the ledger), and batches committed: a
# failed attempt is retried, and would count twice.
SETTLED = re.compile(
    r'^persistence_agent_transaction_attempts_total\{result="(?:committed|duplicate)"\} (\S+)$',
    re.M)
BATCHES = re.compile(
    r'^persistence_agent_batch_transactions_total\{result="committed"\} (\S+)$', re.M)
# Attempts, batched or single, that lost a serialization conflict or a deadlock (then retried).
CONFLICTS = re.compile(
    r'^persistence_agent_(?:batch_transactions|transaction_attempts)_total'
    r'\{result="(?:serialization_failure|deadlock)"\} (\S+)$', re.M)
BIN_MS = 500
COLUMNS = 13
# Whole disks, not their partitions (nor zram or loop devices).
DISK = re.compile(r'^(sd[a-z]+|vd[a-z]+|xvd[a-z]+|nvme\d+n\d+)$')


def machine():
    """Idle and total CPU ticks, runnable threads, disk writes and ms writing, so far."""
    idle = total = running = 0
    for line in open("/proc/stat"):
        f = line.split()
        if not f:
            continue
        if f[0] == "cpu":
            ticks = [int(x) for x in f[1:9]]
            idle, total = ticks[3] + ticks[4], sum(ticks)
        elif f[0] == "procs_running":
            running = int(f[1])
    writes = writing_ms = 0
    for line in open("/proc/diskstats"):
        f = line.split()
        if len(f) > 10 and DISK.match(f[2]):
            writes, writing_ms = writes + int(f[7]), writing_ms + int(f[10])
    return idle, total, running, writes, writing_ms


# The processes watched, as scripts/cores.py groups them, by column.
WATCHED = {"broker": 0, "agent": 1, "postgres": 2}


def watched(agents):
    """The pids of the broker, the agent and PostgreSQL, by column."""
    columns = {pid: WATCHED.get(cores.group(s[0], pid, agents))
               for pid, s in cores.processes().items()}
    return {pid: c for pid, c in columns.items() if c is not None}


def uptime_ticks():
    """Clock ticks since boot: the unit of a process's start time in /proc/<pid>/stat."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


class Processes:
    """CPU ticks the broker, the agent and PostgreSQL used so far, summed from the changes
    between looks; a process first seen at a look counts whole if it started after the
    sampler did (a backend opened during the load), else from that look on."""

    def __init__(self, agents):
        self.agents, self.looks, self.pids, self.last, self.used = agents, 0, {}, {}, [0, 0, 0]
        self.since = uptime_ticks()

    def read(self):
        if self.looks % 10 == 0:
            self.pids = watched(self.agents)
        self.looks += 1
        now = {pid: s[1:] for pid in self.pids if (s := cores.stat(pid))}
        for pid, (t, started) in now.items():
            before = self.last.get(pid)
            if before and before[1] == started:
                self.used[self.pids[pid]] += t - before[0]
            elif int(started) >= self.since:
                self.used[self.pids[pid]] += t
        self.last = now
        return self.used


def sample(url, seconds, out, agents):
    every = float(os.environ.get("TIMELINE_EVERY_MS", "100")) / 1000
    end = time.monotonic() + seconds
    procs = Processes(agents)
    with open(out, "w") as f:
        while time.monotonic() < end:
            try:
                text = urllib.request.urlopen(url, timeout=1).read().decode()
                proc = machine()
            except OSError:
                time.sleep(every)
                continue
            now = int(time.time() * 1000)
            in_flight = sum(float(v) for v in IN_FLIGHT.findall(text))
            attempts = sum(float(v) for v in SETTLED.findall(text))
            batches = sum(float(v) for v in BATCHES.findall(text))
            conflicts = sum(float(v) for v in CONFLICTS.findall(text))
            f.write(f"{now} {in_flight:.0f} {attempts:.0f} {batches:.0f} "
                    f"{' '.join(map(str, proc))} {' '.join(map(str, procs.read()))} "
                    f"{conflicts:.0f}\n")
            time.sleep(every)


def report(samples_file, latencies_file):
    samples = [tuple(map(int, line.split())) for line in open(samples_file) if line.strip()]
    lat = [tuple(map(int, line.split())) for line in open(latencies_file) if line.strip()]
    if not lat or len(samples) < 2:
        sys.exit("timeline.py: nothing to report")
    if any(len(x) != COLUMNS for x in samples):
        sys.exit(f"timeline.py: samples not of this version's {COLUMNS} columns")
    cpus, hz = os.cpu_count() or 1, os.sysconf("SC_CLK_TCK")
    t0 = min(sent for sent, _ in lat)
    bins = {}
    for sent, ms in lat:
        bins.setdefault((sent - t0) // BIN_MS, []).append(ms)
    # Per bin: the samples' in-flight and runnable, and the deltas of every counter, summed.
    rates = {}
    for a, b in zip(samples, samples[1:]):
        if b[0] > a[0]:
            rates.setdefault((b[0] - t0) // BIN_MS, []).append(
                (b[1], b[6], [y - x for x, y in zip(a, b)]))
    print("from the first request   requests  p50 / p99 / max ms   in flight mean / max"
          "   settled/s  batches/s  mean batch   idle cores  runnable  ms/write"
          "   cores: broker / agent / postgres   conflicts/s")
    for k in sorted(bins):
        v = sorted(bins[k])
        line = (f"t+{k * BIN_MS / 1000:5.1f} s {len(v):17d}  "
                f"{v[len(v) // 2]:4d} / {v[int(len(v) * 0.99)]:4d} / {v[-1]:4d}")
        r = rates.get(k)
        if r:
            d = [sum(x[2][i] for x in r) for i in range(COLUMNS)]
            secs = d[0] / 1000
            settled, batches = d[2] / secs, d[3] / secs
            size = f"{settled / batches:10.1f}" if batches else f"{'-':>10}"
            idle = f"{cpus * d[4] / d[5]:10.2f}" if d[5] else f"{'-':>10}"
            write = f"{d[8] / d[7]:8.2f}" if d[7] else f"{'-':>8}"
            line += (f"   {sum(x[0] for x in r) / len(r):9.0f} / {max(x[0] for x in r):4d}"
                     f"   {settled:9.0f}  {batches:9.0f}  {size}"
                     f"   {idle}  {sum(x[1] for x in r) / len(r):8.1f}  {write}"
                     f"   {'  /  '.join(f'{t / hz / secs:.2f}' for t in d[9:12])}"
                     f"   {d[12] / secs:11.0f}")
        print(line)


def main():
    if len(sys.argv) >= 5 and sys.argv[1] == "sample":
        sample(sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5:])
    elif len(sys.argv) == 4 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
