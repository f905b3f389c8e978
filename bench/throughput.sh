#!/usr/bin/env bash
# Throughput benchmark: TCP over the Trellis overlay vs. the raw underlay,
# and (with --relay) over the edge's UDP relay.
#
# Four network namespaces: a switch (bridge br0) joining the server S on
# 198.18.0.1, node A on 198.18.0.2 and node B on 198.18.0.3 (underlay
# 198.18.0.0/24); `trellis server` in S, one `trellis join` agent in A and B,
# then iperf3 from A to B over the overlay (direct path) and over the raw
# underlay. With --relay (or RELAY=1), A then drops all UDP to and from B's
# underlay address (nftables inside A only), so that the pair must go through
# the server's edge (path relay-udp), and iperf3 runs again.
# Nothing is created in, or sent from, the root namespace.
#
# Usage: sudo bench/throughput.sh [--relay]      (TIME=10 seconds per run)
#        TRELLIS_BIN=target/release/trellis TIME=20 bench/throughput.sh --relay
set -euo pipefail

RELAY=${RELAY:-0}
for arg in "$@"; do
    case $arg in
        --relay) RELAY=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "throughput.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "throughput.sh: must run as root (network namespaces, TUN)" >&2
    exit 1
fi
TOOLS="ip iperf3 ping"
[[ $RELAY == 1 ]] && TOOLS="$TOOLS nft"
for tool in $TOOLS; do
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

NS_SW="trb-$$-sw"
NS_S="trb-$$-s"
NS_A="trb-$$-a"
NS_B="trb-$$-b"
ALL_NS=("$NS_SW" "$NS_S" "$NS_A" "$NS_B")
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
    # Whatever still runs inside our namespaces (a PID above may be the
    # subshell that started it rather than the process itself).
    for ns in "${ALL_NS[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null
    done
    wait 2>/dev/null
    for ns in "${ALL_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
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

in_s() { ip netns exec "$NS_S" "$@"; }
in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }

IP_UA=198.18.0.2
IP_UB=198.18.0.3
echo "== topology: $NS_S (server 198.18.0.1), $NS_A ($IP_UA), $NS_B ($IP_UB) on a bridge in $NS_SW"
for ns in "${ALL_NS[@]}"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n "$NS_SW" link add br0 type bridge
ip -n "$NS_SW" link set br0 up
plug() { # namespace address port-name
    ip -n "$1" link add eth0 type veth peer name "$3" netns "$NS_SW"
    ip -n "$NS_SW" link set "$3" master br0
    ip -n "$NS_SW" link set "$3" up
    ip -n "$1" addr add "$2/24" dev eth0
    ip -n "$1" link set eth0 up
}
plug "$NS_S" 198.18.0.1 ps
plug "$NS_A" "$IP_UA" pa
plug "$NS_B" "$IP_UB" pb

URL=http://198.18.0.1:8080
in_s "$TRELLIS_BIN" server --data-dir "$WORK/server" --listen 198.18.0.1:8080 \
    --edge-udp 198.18.0.1:3478 >"$WORK/server.log" 2>&1 &
PIDS+=($!)

http_ok() {
    if command -v curl >/dev/null; then
        in_s curl -sf -m 2 "$URL/api/v1/health" >/dev/null
    else
        in_s bash -c 'exec 3<>/dev/tcp/198.18.0.1/8080 && printf "GET /api/v1/health HTTP/1.0\r\n\r\n" >&3 && head -1 <&3 | grep -q " 200 "'
    fi
}
for i in $(seq 300); do
    http_ok && break
    [[ $i -eq 300 ]] && { echo "server did not become healthy" >&2; exit 1; }
    sleep 0.1
done
KEY=$(head -1 "$WORK/server/admin.key")
TOKEN=$(in_s "$TRELLIS_BIN" token create --reusable --server "$URL" --api-key "$KEY")

# --accept-dns=false: the benchmark never touches any resolver configuration.
in_a "$TRELLIS_BIN" join --server "$URL" --token "$TOKEN" --name bench-a \
    --state-dir "$WORK/a" --accept-dns=false >"$WORK/node-a.log" 2>&1 &
PIDS+=($!)
in_b "$TRELLIS_BIN" join --server "$URL" --token "$TOKEN" --name bench-b \
    --state-dir "$WORK/b" --accept-dns=false >"$WORK/node-b.log" 2>&1 &
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

# Path A reports for B: direct, relay-udp or relay-tcp.
path_a() {
    { in_a "$TRELLIS_BIN" status --json --state-dir "$WORK/a" 2>/dev/null || true; } |
        grep -o '"path": *"[^"]*"' | head -1 | sed 's/.*: *"\(.*\)"/\1/'
}
wait_path() { # wanted path, seconds
    local p=""
    for _ in $(seq $(( $2 * 10 ))); do
        p=$(path_a)
        [[ $p == "$1" ]] && { echo "$p"; return 0; }
        sleep 0.1
    done
    echo "${p:-unknown}"
    return 1
}

in_b iperf3 -s >"$WORK/iperf3-server.log" 2>&1 &
PIDS+=($!)
sleep 0.5

mbits() { # iperf3 -J file -> receiver Mbit/s
    awk '/"sum_received"/ {f=1} f && /"bits_per_second"/ {split($0, kv, ":"); v = kv[2]; gsub(/[^0-9.eE+-]/, "", v); printf "%.1f\n", v / 1e6; exit}' "$1"
}
latency() { # ping -q output -> "min/avg/max ms"
    awk -F' = ' '/^(rtt|round-trip)/ {split($2, a, "/"); printf "min %s / avg %s / max %s ms\n", a[1], a[2], a[3]}'
}

if ! DIRECT_PATH=$(wait_path direct 15); then
    echo "warning: A's path to B is $DIRECT_PATH, not direct, after 15 s" >&2
fi
echo "== iperf3 ${TIME}s over the overlay (A -> $IP_B, path $DIRECT_PATH)"
in_a iperf3 -c "$IP_B" -t "$TIME" -J >"$WORK/overlay.json"
OVERLAY=$(mbits "$WORK/overlay.json")
echo "== iperf3 ${TIME}s over the raw underlay (A -> $IP_UB)"
in_a iperf3 -c "$IP_UB" -t "$TIME" -J >"$WORK/raw.json"
RAW=$(mbits "$WORK/raw.json")

LAT_OVERLAY=$({ in_a ping -c 20 -i 0.2 -q "$IP_B" || true; } | latency)
LAT_RAW=$({ in_a ping -c 20 -i 0.2 -q "$IP_UB" || true; } | latency)

if [[ $RELAY == 1 ]]; then
    echo "== blocking UDP between $IP_UA and $IP_UB (nftables in $NS_A): A and B must use the edge"
    in_a nft add table ip bench_relay
    in_a nft add chain ip bench_relay out '{ type filter hook output priority 0; }'
    in_a nft add chain ip bench_relay in '{ type filter hook input priority 0; }'
    in_a nft add rule ip bench_relay out ip daddr "$IP_UB" ip protocol udp drop
    in_a nft add rule ip bench_relay in ip saddr "$IP_UB" ip protocol udp drop
    # Keep traffic flowing so that the silent direct path is noticed.
    in_a ping -c 100 -i 0.1 -W 1 "$IP_B" >/dev/null 2>&1 &
    PING_PID=$!
    PIDS+=($PING_PID)
    if ! RELAY_PATH=$(wait_path relay-udp 20); then
        echo "A's path to B is $RELAY_PATH, not relay-udp, 20 s after blocking UDP" >&2
        exit 1
    fi
    kill "$PING_PID" 2>/dev/null || true
    for i in $(seq 60); do
        in_a ping -c 1 -W 1 "$IP_B" >/dev/null 2>&1 && break
        [[ $i -eq 60 ]] && { echo "no overlay ping from A to B over the relay" >&2; exit 1; }
        sleep 0.5
    done
    echo "== iperf3 ${TIME}s over the overlay (A -> $IP_B, path $RELAY_PATH via the edge on 198.18.0.1)"
    in_a iperf3 -c "$IP_B" -t "$TIME" -J >"$WORK/relay.json"
    RELAYED=$(mbits "$WORK/relay.json")
    LAT_RELAY=$({ in_a ping -c 20 -i 0.2 -q "$IP_B" || true; } | latency)
    AFTER=$(path_a)
    [[ $AFTER == relay-udp ]] || echo "warning: path after the relayed run is $AFTER" >&2
fi

echo
echo "== results"
printf '%-26s %10s Mbit/s\n' "overlay TCP ($DIRECT_PATH):" "$OVERLAY"
[[ $RELAY == 1 ]] && printf '%-26s %10s Mbit/s\n' "overlay TCP (relay-udp):" "$RELAYED"
printf '%-26s %10s Mbit/s\n' "raw underlay TCP:" "$RAW"
awk -v o="$OVERLAY" -v r="$RAW" 'BEGIN { if (r > 0) printf "ratio overlay/raw: %.3f\n", o / r }'
[[ $RELAY == 1 ]] && awk -v o="$RELAYED" -v r="$RAW" 'BEGIN { if (r > 0) printf "ratio relay-udp/raw: %.3f\n", o / r }'
printf '%-26s %s\n' "ping overlay ($DIRECT_PATH):" "$LAT_OVERLAY"
[[ $RELAY == 1 ]] && printf '%-26s %s\n' "ping overlay (relay-udp):" "$LAT_RELAY"
printf '%-26s %s\n' "ping raw:" "$LAT_RAW"
exit 0
