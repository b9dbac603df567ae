#!/usr/bin/env python3
"""Where the machine's CPU went over a window, in cores, for scripts/bench.sh: on a machine the
database, the broker and the agent share, what the agent and the broker take is what the
database cannot have, so this is what bounds the agent's ratio to pgbench's ceiling.

  cores.py snap FILE [PID...]   record every process's CPU time and the machine's totals
                                (with PIDs, also their threads' times and context switches,
                                for scripts/threads.py)
  cores.py at S1 FILE1 [S2 FILE2 ...]
                                prints "ready", then takes the same snapshots S1, S2, ...
                                seconds later, from one process: a snapshot costs it about
                                2 ms of CPU, where a Python start costs about 90 ms, which
                                under a latency run's load coincided with slow requests
  cores.py diff A B [PID...]    cores used between snapshots A and B by postgres, the agent
                                (PIDs), pgbench, the broker (tansu, the bench's mock_broker,
                                or any java process, as for Apache Kafka) and everything else;
                                what stayed idle, what the hypervisor stole, and what no
                                living process accounts for
  cores.py cpu A B PID...       CPU seconds the PIDs used between snapshots A and B

"unaccounted" is CPU time of processes that started and exited inside the window (the bench's
own curl and ps polls, short-lived backends, anything else on the host) plus kernel time no
process is charged for; under heavy steal it can go negative, as processes' times then overlap
the stolen time. A process born inside the window counts all its time. Take both snapshots
while the measured clients run: a process that exited before the second is not seen.
CORES_DEBUG=1 lists each process's ticks on stderr."""
import json
import os
import sys
import time

GROUPS = ["postgres", "agent", "pgbench", "broker", "other"]


def stat(pid):
    """A process's [comm, utime + stime, start time], or None once it has exited; the start
    time tells a reused pid from the process seen before (also scripts/timeline.py's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return [text[text.index("(") + 1 : text.rindex(")")], int(fields[11]) + int(fields[12]),
            fields[19]]


def processes():
    """Every living process's stat, by pid (also scripts/timeline.py's)."""
    return {pid: s for pid in filter(str.isdigit, os.listdir("/proc")) if (s := stat(pid))}


def snap(path, agents=()):
    """With AGENTS (pids), also their threads for scripts/threads.py, at the same moment."""
    procs = processes()
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    machine = {"idle": cpu[3] + cpu[4], "steal": cpu[7], "all": sum(cpu[:8])}
    with open(path, "w") as f:
        snapshot = {"time": time.time(), "procs": procs, "machine": machine}
        if agents:
            import threads  # here: threads.py imports this module

            snapshot["threads"] = threads.tasks(agents)
        json.dump(snapshot, f)


def at(plan):
    """Snapshots at the given offsets in seconds from the "ready" line: [(seconds, path), ...]."""
    print("ready", flush=True)
    start = time.monotonic()
    for secs, path in plan:
        time.sleep(max(0.0, start + secs - time.monotonic()))
        snap(path)


def group(comm, pid, agents):
    if pid in agents:
        return "agent"
    if comm == "postgres":
        return "postgres"
    if comm == "pgbench":
        return "pgbench"
    # comm is cut at 15 characters: a MOCK_BROKER copy named mock_broker-<hash> too.
    if comm in ("tansu", "java") or comm.startswith("mock_broker"):
        return "broker"
    return "other"


def load(path):
    with open(path) as f:
        return json.load(f)


def ticks_by_group(a, b, agents):
    """CPU ticks each group used between snapshots a and b."""
    used = dict.fromkeys(GROUPS, 0)
    for pid, (comm, ticks, started) in b["procs"].items():
        before = a["procs"].get(pid)
        start = before[1] if before and before[2] == started else 0
        used[group(comm, pid, agents)] += ticks - start
        if os.environ.get("CORES_DEBUG") and ticks > start:
            print(pid, comm, ticks - start, "" if start else "born", file=sys.stderr)
    return used


def diff(a_path, b_path, agents):
    a, b = load(a_path), load(b_path)
    hz = os.sysconf("SC_CLK_TCK")
    secs = b["time"] - a["time"]
    used = ticks_by_group(a, b, agents)
    machine = {k: b["machine"][k] - a["machine"][k] for k in ("idle", "steal", "all")}
    accounted = sum(used.values()) + machine["idle"] + machine["steal"]
    used["idle"], used["steal"] = machine["idle"], machine["steal"]
    used["unaccounted"] = machine["all"] - accounted
    print("cores: " + ", ".join(f"{k} {v / hz / secs:.2f}" for k, v in used.items()))


def cpu(a_path, b_path, agents):
    used = ticks_by_group(load(a_path), load(b_path), agents)
    print(f"{used['agent'] / os.sysconf('SC_CLK_TCK'):.2f}")


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "snap":
        snap(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) >= 4 and len(sys.argv) % 2 == 0 and sys.argv[1] == "at":
        at([(float(s), p) for s, p in zip(sys.argv[2::2], sys.argv[3::2])])
    elif len(sys.argv) >= 4 and sys.argv[1] == "diff":
        diff(sys.argv[2], sys.argv[3], set(sys.argv[4:]))
    elif len(sys.argv) >= 5 and sys.argv[1] == "cpu":
        cpu(sys.argv[2], sys.argv[3], set(sys.argv[4:]))
    else:
        sys.exit("usage: cores.py snap FILE [PID...] | cores.py at S1 FILE1 [S2 FILE2 ...]"
                 " | cores.py diff A B [PID...] | cores.py cpu A B PID...")
