#!/usr/bin/env bash
# Ping latency through Trellis next to boringtun-cli, in the same two
# namespaces at the same time (the shared harness's pb-a/pb-b pair), and
# where the time of a round trip goes.
#
#   sudo bench/latency.sh                 # 6 rounds of 500 pings at 10 ms, each tunnel in turn
#   ROUNDS=10 COUNT=1000 INTERVAL=0.001 sudo bench/latency.sh
#
# Trellis runs as in bench/peers-up.sh (a real server and two real nodes);
# boringtun-cli (if installed, see ../shared/peers/setup.sh) is configured as
# the harness does it, on 100.64.1.0/24 beside Trellis. Each round pings one
# tunnel, then the other, so both see the same machine; the ratio of the
# medians is the figure to compare. With `perf` installed, one more round of
# each runs with its syscalls traced and bench/latency-stages.py shows, per
# side, the syscalls per ping, the time in user space between them (lookup,
# encryption, ...) and the time inside them.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS_DIR=${PEERS_DIR:-$REPO/../shared/peers}
ROUNDS=${ROUNDS:-6}
COUNT=${COUNT:-500}
INTERVAL=${INTERVAL:-0.01}
[[ $(id -u) -eq 0 ]] || { echo "latency.sh: must run as root (namespaces, TUN)" >&2; exit 1; }
[[ -x $PEERS_DIR/netns-pair.sh ]] || { echo "latency.sh: no harness at $PEERS_DIR (set PEERS_DIR)" >&2; exit 64; }
if [[ -z ${TRELLIS_BIN:-} ]]; then
    (cd "$REPO" && cargo build --release -p trellis)
    TRELLIS_BIN=$REPO/target/release/trellis
fi
export TRELLIS_BIN
WORK=$(mktemp -d /tmp/trellis-latency.XXXXXX)
BT_PIDS=()
cleanup() {
    for p in $(cat "$WORK/pids" 2>/dev/null) "${BT_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    "$PEERS_DIR/netns-pair.sh" down >/dev/null 2>&1 || true
    rm -f /var/run/wireguard/pb-lt-a.sock /var/run/wireguard/pb-lt-b.sock
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== machine: $(nproc) cpus, $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(uname -sr)"
"$PEERS_DIR/netns-pair.sh" up >/dev/null
"$REPO/bench/peers-up.sh" pb-a pb-b 198.18.0.1 198.18.0.2 100.64.0.1 100.64.0.2 24 "$WORK" > "$WORK/up.log" 2>&1
T_IP=$(cat "$WORK/overlay_b")
T_A=$(sed -n 2p "$WORK/pids") T_B=$(sed -n 3p "$WORK/pids")
for _ in $(seq 40); do ip netns exec pb-a ping -c1 -W1 -q "$T_IP" >/dev/null 2>&1 && break; sleep 0.25; done

BT_IP=
if command -v boringtun-cli >/dev/null && command -v wg >/dev/null; then
    (umask 077; wg genkey > "$WORK/a.key"; wg genkey > "$WORK/b.key")
    mkdir -p /var/run/wireguard
    for side in a b; do
        ip netns exec "pb-$side" boringtun-cli --foreground --disable-drop-privileges \
            --log "$WORK/bt-$side.log" "pb-lt-$side" > /dev/null 2>&1 &
        BT_PIDS+=($!)
    done
    for _ in $(seq 100); do
        [[ -S /var/run/wireguard/pb-lt-a.sock && -S /var/run/wireguard/pb-lt-b.sock ]] && break
        sleep 0.05
    done
    ip netns exec pb-a wg set pb-lt-a private-key "$WORK/a.key" listen-port 51899 \
        peer "$(wg pubkey < "$WORK/b.key")" endpoint 198.18.0.2:51899 allowed-ips 100.64.1.2/32
    ip netns exec pb-b wg set pb-lt-b private-key "$WORK/b.key" listen-port 51899 \
        peer "$(wg pubkey < "$WORK/a.key")" endpoint 198.18.0.1:51899 allowed-ips 100.64.1.1/32
    ip -n pb-a addr add 100.64.1.1/24 dev pb-lt-a
    ip -n pb-b addr add 100.64.1.2/24 dev pb-lt-b
    ip -n pb-a link set pb-lt-a mtu 1420 up
    ip -n pb-b link set pb-lt-b mtu 1420 up
    for _ in $(seq 40); do ip netns exec pb-a ping -c1 -W1 -q 100.64.1.2 >/dev/null 2>&1 && break; sleep 0.25; done
    BT_IP=100.64.1.2
else
    echo "(boringtun-cli or wg not installed: Trellis alone)"
fi

# One round: COUNT pings, printed as avg and percentiles in ms.
round() {
    ip netns exec pb-a ping -n -c "$COUNT" -i "$INTERVAL" "$1" | grep -o 'time=[0-9.]*' | cut -d= -f2 |
        sort -n | awk '{a[NR]=$1; s+=$1} END {if (NR) printf "%.3f %.3f %.3f %.3f\n", s/NR, a[int(NR*.5)+1], a[int(NR*.9)], a[int(NR*.99)]}'
}
echo "== $ROUNDS rounds of $COUNT pings every ${INTERVAL}s (avg p50 p90 p99, ms)"
: > "$WORK/rounds"
for r in $(seq "$ROUNDS"); do
    t=$(round "$T_IP"); echo "trellis $t" >> "$WORK/rounds"; line="round $r  trellis $t"
    if [[ -n $BT_IP ]]; then b=$(round "$BT_IP"); echo "boringtun $b" >> "$WORK/rounds"; line="$line  boringtun $b"; fi
    echo "$line"
done
python3 - "$WORK/rounds" <<'PY'
import sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    name, *v = line.split()
    rows.setdefault(name, []).append([float(x) for x in v])
med = {n: [st.median(r[i] for r in rs) for i in range(4)] for n, rs in rows.items()}
for n, m in med.items():
    print("median over rounds  %-9s avg %.3f  p50 %.3f  p90 %.3f  p99 %.3f ms" % (n, *m))
if "boringtun" in med:
    print("trellis / boringtun: avg %.2fx  p50 %.2fx" % (med["trellis"][0] / med["boringtun"][0], med["trellis"][1] / med["boringtun"][1]))
PY

if command -v perf >/dev/null; then
    echo "== where the time goes ($COUNT pings each, syscalls traced; bench/latency-stages.py)"
    stages() {
        perf record -q -e raw_syscalls:sys_enter,raw_syscalls:sys_exit,sched:sched_switch \
            -p "$2,$3" -o "$WORK/stages.data" -- \
            ip netns exec pb-a ping -q -n -c "$COUNT" -i "$INTERVAL" "$1" >/dev/null 2>&1
        perf script -F comm,pid,tid,time,event,trace -i "$WORK/stages.data" 2>/dev/null > "$WORK/stages.txt"
        python3 "$REPO/bench/latency-stages.py" "$WORK/stages.txt" "$COUNT" "$2" "$3"
    }
    echo "trellis:"
    stages "$T_IP" "$T_A" "$T_B"
    if [[ -n $BT_IP ]]; then
        echo "boringtun:"
        stages "$BT_IP" "${BT_PIDS[0]}" "${BT_PIDS[1]}"
    fi
    echo "(user: between one syscall's return and the next call, median × per ping; in work syscalls: reads, writes, sends, receives, without poll/epoll waits)"
fi
