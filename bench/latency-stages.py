#!/usr/bin/env python3
"""Where a tunnel's share of a ping round trip goes, from its syscalls
(see bench/latency.sh).

    latency-stages.py SCRIPT PINGS PID_A PID_B

SCRIPT is `perf script -F comm,pid,tid,time,event,trace` output of
`perf record -e raw_syscalls:sys_enter,raw_syscalls:sys_exit,sched:sched_switch
-p PID_A,PID_B`
taken while PINGS pings went through the tunnel; PID_A is the tunnel process
in the namespace that pings, PID_B the one that answers.

For each side it prints, per ping:
- the syscalls made (all threads of the process);
- the time in user space between one syscall's return and the next call on
  the same thread, as the median of each step times how often it happens (a
  step is "after X, before Y": after a TUN read and before the send is the
  lookup and encryption of the packet read). A step during which the thread
  was switched out (preempted, or it yielded) is waiting, not work: it is
  counted apart, as "preempted". A step of 1 ms or more without a switch
  (the thread ran, but not on this round trip's work) is left out;
- the time inside syscalls that do work (reads, writes, sends, receives; the
  send includes the kernel's delivery to the other namespace, the TUN write
  the kernel's answer), as median times count; calls that found nothing
  (EAGAIN) apart. Waiting syscalls (poll,
  epoll_wait, futex, sleeps) are left out: their time is idle time.

The tracepoints add about a microsecond to each syscall, to both tunnels
alike per call; compare sides and steps, not absolute round trips.
"""
import collections
import re
import statistics
import sys

NAMES = {
    0: "read", 1: "write", 7: "poll", 19: "readv", 20: "writev", 35: "nanosleep",
    44: "sendto", 45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 202: "futex",
    219: "restart", 230: "clock_nanosleep", 232: "epoll_wait", 233: "epoll_ctl",
    271: "ppoll", 281: "epoll_pwait", 299: "recvmmsg", 307: "sendmmsg", 441: "epoll_pwait2",
}
WAITING = {"poll", "ppoll", "epoll_wait", "epoll_pwait", "epoll_pwait2", "futex",
           "nanosleep", "clock_nanosleep", "restart"}
LINE = re.compile(
    r"\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(?:.*= (-?\d+))?")
SWITCH = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+([\d.]+):\s+sched:sched_switch:.*prev_pid=(\d+)")
MAX_STEP_US = 1000.0
# Steps and calls rarer than this (per ping) are background (timers, control).
MIN_RATE = 0.2


def name(nr):
    return NAMES.get(nr, "nr%d" % nr)


def side(events, pings):
    last_exit = {}  # tid -> (time, nr)
    entered = {}  # tid -> (time, nr)
    switched = set()  # tids switched out since their last syscall returned
    steps = collections.defaultdict(list)
    waits = []
    calls = collections.defaultdict(list)
    count = 0
    for ts, tid, kind, nr, ret in events:
        if kind == "switch":
            if tid not in entered:
                switched.add(tid)
            continue
        if kind == "enter":
            count += 1
            if tid in last_exit:
                t0, prev = last_exit[tid]
                gap = (ts - t0) * 1e6
                if tid in switched:
                    waits.append(gap)
                elif gap < MAX_STEP_US:
                    steps[(prev, nr)].append(gap)
            entered[tid] = (ts, nr)
            switched.discard(tid)
        else:
            last_exit[tid] = (ts, nr)
            start = entered.pop(tid, None)
            if start and start[1] == nr:
                calls[(nr, ret is not None and ret < 0)].append((ts - start[0]) * 1e6)
    user = 0.0
    rows = []
    for (prev, nr), gaps in steps.items():
        rate = len(gaps) / pings
        if rate < MIN_RATE:
            continue
        med = statistics.median(gaps)
        user += med * rate
        rows.append((med * rate, "%s→%s %.1f×%.2f" % (name(prev), name(nr), med, rate)))
    kernel = 0.0
    krows = []
    for (nr, failed), durations in calls.items():
        rate = len(durations) / pings
        if rate < MIN_RATE or name(nr) in WAITING:
            continue
        med = statistics.median(durations)
        kernel += med * rate
        label = name(nr) + (" (nothing)" if failed else "")
        krows.append((med * rate, "%s %.1f×%.2f" % (label, med, rate)))
    head = "%.1f syscalls, user %.0f µs, in work syscalls %.0f µs" % (count / pings, user, kernel)
    if waits:
        head += ", preempted between syscalls %.2f× (median %.0f µs)" % (
            len(waits) / pings, statistics.median(waits))
    return [
        head,
        "    user steps (µs × per ping): " + ", ".join(r for _, r in sorted(rows, reverse=True)),
        "    syscalls (µs × per ping):   " + ", ".join(r for _, r in sorted(krows, reverse=True)),
    ]


def main():
    path, pings, pid_a, pid_b = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    events = {pid_a: [], pid_b: []}
    for line in open(path, encoding="utf-8", errors="replace"):
        m = LINE.match(line)
        if m:
            pid = int(m.group(2))
            if pid in events:
                ret = int(m.group(7)) if m.group(7) is not None else None
                events[pid].append((float(m.group(4)), int(m.group(3)), m.group(5), int(m.group(6)), ret))
            continue
        m = SWITCH.match(line)
        if m and int(m.group(2)) in events and m.group(3) == m.group(5):
            events[int(m.group(2))].append((float(m.group(4)), int(m.group(3)), "switch", 0, None))
    for label, pid in (("A (pings)", pid_a), ("B (answers)", pid_b)):
        lines = side(events[pid], pings)
        print("  %s: %s" % (label, lines[0]))
        for extra in lines[1:]:
            print(extra)


if __name__ == "__main__":
    main()
