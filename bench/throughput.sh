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

NAME=throughput.sh
TOOLS="ip iperf3 ping"
[[ $RELAY == 1 ]] && TOOLS="$TOOLS nft"
TOOL_VERSION="iperf3: $(iperf3 --version 2>/dev/null | head -1 || true)"
SERVER_EXTRA=()
# shellcheck source=bench/lab.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab.sh"

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
