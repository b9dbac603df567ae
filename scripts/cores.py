#!/usr/bin/env python3
"""Where the machine's CPU went over a window, in cores, for scripts/bench.sh: on a machine the
database, the broker and the agent share, what the agent and the broker take is what the
database cannot have, so this is what bounds the agent's ratio to pgbench's ceiling.

  cores.py snap FILE            record every process's CPU time and the machine's totals
  cores.py diff A B [PID...]    cores used between snapshots A and B by postgres, the agent
                                (PIDs), pgbench, the broker (tansu, or java for Apache Kafka)
                                and everything else, and what stayed idle or was stolen by the
                                hypervisor

A process that exited before the second snapshot is missed (its time is gone), so take both
while the measured clients run; one born between them counts all its time. CORES_DEBUG=1 lists
each process's ticks on stderr (to find what "other" was)."""
import json
import os
import sys
import time


def snap(path):
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[pid] = [comm, int(fields[11]) + int(fields[12])]  # utime + stime
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal
    machine = {"idle": cpu[3] + cpu[4], "steal": cpu[7], "all": sum(cpu[:8])}
    with open(path, "w") as f:
        json.dump({"time": time.time(), "procs": procs, "machine": machine}, f)


def group(comm, pid, agents):
    if pid in agents:
        return "agent"
    if comm == "postgres" or comm.startswith("postgres:"):
        return "postgres"
    if comm == "pgbench":
        return "pgbench"
    if comm in ("tansu", "java"):
        return "broker"
    return "other"


def diff(a_path, b_path, agents):
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    hz = os.sysconf("SC_CLK_TCK")
    secs = b["time"] - a["time"]
    used = dict.fromkeys(["postgres", "agent", "pgbench", "broker", "other"], 0)
    for pid, (comm, ticks) in b["procs"].items():
        # One born in the window (a connection the agent opened late) used all of it there.
        before = a["procs"].get(pid)
        start = before[1] if before and before[0] == comm else 0
        used[group(comm, pid, agents)] += ticks - start
        if os.environ.get("CORES_DEBUG") and ticks - start > 0:
            print(pid, comm, ticks - start, "new" if start == 0 else "", file=sys.stderr)
    for k in ("idle", "steal"):
        used[k] = b["machine"][k] - a["machine"][k]
    print("cores: " + ", ".join(f"{k} {v / hz / secs:.2f}" for k, v in used.items()))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "snap":
        snap(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "diff":
        diff(sys.argv[2], sys.argv[3], set(sys.argv[4:]))
    else:
        sys.exit(__doc__)
