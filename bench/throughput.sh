#!/usr/bin/env bash
# Throughput benchmark: TCP over the Trellis overlay vs. the raw underlay.
#
# Two network namespaces joined by a veth pair (underlay 198.18.0.0/24),
# `trellis server` in A on 198.18.0.1, one `trellis join` agent in each
# namespace, then iperf3 from A to B over the overlay and over the raw veth.
# Nothing is created in, or sent from, the root namespace.
#
# Usage: sudo bench/throughput.sh            (TIME=10 seconds per run)
#        TRELLIS_BIN=target/release/trellis TIME=20 bench/throughput.sh
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "throughput.sh: must run as root (network namespaces, TUN)" >&2
    exit 1
fi
for tool in ip iperf3 ping; do
    command -v "$tool" >/dev/null || { echo "throughput.sh: $tool is required" >&2; exit 1; }
done

TIME=${TIME:-10}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

echo "== machine"
echo "nproc:  $(nproc)"
echo "cpu:    $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "kernel: $(uname -srm)"
echo "iperf3: $(iperf3 --version | head -1)"

if [[ -z ${TRELLIS_BIN:-} ]]; then
    echo "== building trellis (release)"
    (cd "$ROOT" && cargo build --release -p trellis)
    TRELLIS_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/trellis"
fi
[[ -x $TRELLIS_BIN ]] || { echo "throughput.sh: $TRELLIS_BIN is not executable" >&2; exit 1; }
TRELLIS_BIN=$(realpath "$TRELLIS_BIN")
echo "binary: $TRELLIS_BIN"

# Remove namespaces left by earlier runs whose process is gone.
for ns in $(ip netns list | awk '{print $1}' | grep '^trb-' || true); do
    pid=${ns#trb-}; pid=${pid%%-*}
    if [[ $pid =~ ^[0-9]+$ ]] && [[ ! -d /proc/$pid ]]; then
        ip netns del "$ns" 2>/dev/null || true
    fi
done

NS_A="trb-$$-a"
NS_B="trb-$$-b"
WORK=$(mktemp -d /tmp/trellis-bench.XXXXXX)
PIDS=()

cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for _ in $(seq 20); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 0 ]] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
    wait 2>/dev/null
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    if [[ $rc -ne 0 ]]; then
        echo "== failed (exit $rc); last log lines:" >&2
        for f in "$WORK"/*.log; do
            [[ -f $f ]] || continue
            echo "--- $f" >&2
            tail -n 30 "$f" >&2
        done
    fi
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

echo "== topology: $NS_A (198.18.0.1) <-veth-> $NS_B (198.18.0.2)"
ip netns add "$NS_A"
ip netns add "$NS_B"
ip -n "$NS_A" link add eth0 type veth peer name eth0 netns "$NS_B"
for ns in "$NS_A" "$NS_B"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
done
ip -n "$NS_A" addr add 198.18.0.1/24 dev eth0
ip -n "$NS_B" addr add 198.18.0.2/24 dev eth0

URL=http://198.18.0.1:8080
in_a "$TRELLIS_BIN" server --data-dir "$WORK/server" --listen 198.18.0.1:8080 \
    --edge-udp 198.18.0.1:3478 >"$WORK/server.log" 2>&1 &
PIDS+=($!)

http_ok() {
    if command -v curl >/dev/null; then
        in_a curl -sf -m 2 "$URL/api/v1/health" >/dev/null
    else
        in_a bash -c 'exec 3<>/dev/tcp/198.18.0.1/8080 && printf "GET /api/v1/health HTTP/1.0\r\n\r\n" >&3 && head -1 <&3 | grep -q " 200 "'
    fi
}
for i in $(seq 300); do
    http_ok && break
    [[ $i -eq 300 ]] && { echo "server did not become healthy" >&2; exit 1; }
    sleep 0.1
done
KEY=$(head -1 "$WORK/server/admin.key")
TOKEN=$(in_a "$TRELLIS_BIN" token create --reusable --server "$URL" --api-key "$KEY")

in_a "$TRELLIS_BIN" join --server "$URL" --token "$TOKEN" --name bench-a \
    --state-dir "$WORK/a" >"$WORK/node-a.log" 2>&1 &
PIDS+=($!)
in_b "$TRELLIS_BIN" join --server "$URL" --token "$TOKEN" --name bench-b \
    --state-dir "$WORK/b" >"$WORK/node-b.log" 2>&1 &
PIDS+=($!)

overlay_ip() { # namespace
    { ip -n "$1" -4 -o addr show dev trellis0 2>/dev/null || true; } | awk '{split($4, a, "/"); print a[1]; exit}'
}
IP_A="" IP_B=""
for i in $(seq 300); do
    IP_A=$(overlay_ip "$NS_A"); IP_B=$(overlay_ip "$NS_B")
    [[ -n $IP_A && -n $IP_B ]] && break
    [[ $i -eq 300 ]] && { echo "agents did not bring up trellis0" >&2; exit 1; }
    sleep 0.1
done
echo "overlay: bench-a $IP_A, bench-b $IP_B"
for i in $(seq 60); do
    in_a ping -c 1 -W 1 "$IP_B" >/dev/null 2>&1 && break
    [[ $i -eq 60 ]] && { echo "no overlay ping from A to B ($IP_B)" >&2; exit 1; }
    sleep 0.5
done

in_b iperf3 -s >"$WORK/iperf3-server.log" 2>&1 &
PIDS+=($!)
sleep 0.5

mbits() { # iperf3 -J file -> receiver Mbit/s
    awk '/"sum_received"/ {f=1} f && /"bits_per_second"/ {split($0, kv, ":"); v = kv[2]; gsub(/[^0-9.eE+-]/, "", v); printf "%.1f\n", v / 1e6; exit}' "$1"
}
latency() { # ping -q output -> "min/avg/max ms"
    awk -F' = ' '/^(rtt|round-trip)/ {split($2, a, "/"); printf "min %s / avg %s / max %s ms\n", a[1], a[2], a[3]}'
}

echo "== iperf3 ${TIME}s over the overlay (A -> $IP_B)"
in_a iperf3 -c "$IP_B" -t "$TIME" -J >"$WORK/overlay.json"
OVERLAY=$(mbits "$WORK/overlay.json")
echo "== iperf3 ${TIME}s over the raw veth (A -> 198.18.0.2)"
in_a iperf3 -c 198.18.0.2 -t "$TIME" -J >"$WORK/raw.json"
RAW=$(mbits "$WORK/raw.json")

LAT_OVERLAY=$({ in_a ping -c 20 -i 0.2 -q "$IP_B" || true; } | latency)
LAT_RAW=$({ in_a ping -c 20 -i 0.2 -q 198.18.0.2 || true; } | latency)

echo
echo "== results"
printf 'overlay TCP: %10s Mbit/s\n' "$OVERLAY"
printf 'raw veth TCP:%10s Mbit/s\n' "$RAW"
awk -v o="$OVERLAY" -v r="$RAW" 'BEGIN { if (r > 0) printf "ratio overlay/raw: %.3f\n", o / r }'
echo "ping overlay: $LAT_OVERLAY"
echo "ping raw:     $LAT_RAW"
