#!/usr/bin/env python3
"""Splits ping round trips through a tunnel into the stages on the critical
path, from `perf sched timehist -w` output (see bench/latency.sh).

    latency-phases.py TIMEHIST PID_A PID_B

PID_A is the tunnel process in the namespace that pings, PID_B the one that
answers. For each echo request the chain of wake-ups is followed:

    ping wakes A ─d1─ A runs ─r1─ A wakes B ─d2─ B runs ─r2─ B wakes A
    ─d3─ A runs ─r3─ A wakes ping ─d4─ ping runs

d = waiting to run after a wake-up (scheduling), r = running until the next
process in the chain is woken (reading, crypto, syscalls; B's r2 includes
the kernel answering the ping). Prints the median and mean of each, in µs.
"""
import re
import statistics
import sys

WAKE = re.compile(r"(\S+)\[(\d+)(?:/(\d+))?\]\s+awakened: (\S+)\[(\d+)(?:/(\d+))?\]")
SWITCH = re.compile(r"(\S+)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
TIME = re.compile(r"\s*([\d.]+) \[\d+\]")


def main():
    path, pid_a, pid_b = sys.argv[1], sys.argv[2], sys.argv[3]
    wakes = []  # (time, waker comm, waker pid, wakee tid, wakee pid, wakee comm)
    runs = {}  # tid -> [(start, end)]
    for line in open(path, encoding="utf-8", errors="replace"):
        t = TIME.match(line)
        if not t:
            continue
        at = float(t.group(1))
        w = WAKE.search(line)
        if w:
            wakes.append((at, w.group(1), w.group(3) or w.group(2),
                          w.group(5), w.group(6) or w.group(5), w.group(4)))
            continue
        s = SWITCH.search(line)
        if s:
            run_ms = float(s.group(6))
            runs.setdefault(s.group(2), []).append((at - run_ms / 1000, at))

    def start_after(tid, t):
        for a, b in runs.get(tid, []):
            if b >= t:
                return max(a, t)
        return None

    def next_wake(i, t, waker_pid, pred):
        for x in wakes[i:]:
            if x[0] >= t and x[2] == waker_pid and pred(x):
                return x
        return None

    phases = {k: [] for k in ("d1", "r1", "d2", "r2", "d3", "r3", "d4", "total")}
    for i, (t0, waker, waker_pid, tid, pid, _) in enumerate(wakes):
        if not waker.startswith("ping") or pid != pid_a:
            continue
        s1 = start_after(tid, t0)
        w1 = next_wake(i, t0, pid_a, lambda x: x[4] == pid_b)
        if s1 is None or w1 is None:
            continue
        s2 = start_after(w1[3], w1[0])
        w2 = next_wake(i, w1[0], pid_b, lambda x: x[4] == pid_a)
        if s2 is None or w2 is None:
            continue
        s3 = start_after(w2[3], w2[0])
        w3 = next_wake(i, w2[0], pid_a, lambda x: x[5].startswith("ping"))
        if s3 is None or w3 is None:
            continue
        s4 = start_after(w3[3], w3[0])
        if s4 is None or s4 - t0 > 0.005:
            continue
        got = dict(d1=s1 - t0, r1=w1[0] - s1, d2=s2 - w1[0], r2=w2[0] - s2,
                   d3=s3 - w2[0], r3=w3[0] - s3, d4=s4 - w3[0], total=s4 - t0)
        for k, v in got.items():
            phases[k].append(v * 1e6)
    if not phases["total"]:
        print("no complete round trips found")
        return
    print("round trips %d; median/mean µs: %s" % (len(phases["total"]), "  ".join(
        "%s %.0f/%.0f" % (k, statistics.median(v), statistics.mean(v)) for k, v in phases.items())))


if __name__ == "__main__":
    main()
