#!/usr/bin/env bash
# Up-script for the side-by-side benchmark harness in ../shared/peers (see its
# README, "Plugging in a new implementation"): starts a real Trellis server and
# two real Trellis nodes in the two namespaces it is given, as a user would.
#
#   peers-up.sh <ns_a> <ns_b> <underlay_a> <underlay_b> <overlay_a> <overlay_b> <prefix> <workdir>
#
# The server (control plane + edge) runs in ns_a on <underlay_a>; both nodes
# enroll with a token over HTTP and get their overlay addresses from it
# (<overlay_a>/<overlay_b> are not used); the address node B got is written to
# <workdir>/overlay_b. Every long-running PID goes to <workdir>/pids.
#
# TRELLIS_BIN: the binary (default: target/release/trellis of this checkout,
# built if missing). TRELLIS_FORCE_RELAY=1: drop UDP between the two nodes'
# WireGuard sockets (everything but the edge port) so that they must use the
# edge's relay — the `relay-udp` variant (bench/peers-up-relay.sh).
set -euo pipefail
NS_A=$1 NS_B=$2 UL_A=$3 UL_B=$4 WORK=$8
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${TRELLIS_BIN:-$REPO/target/release/trellis}
if [[ ! -x $BIN ]]; then
    (cd "$REPO" && cargo build --release -p trellis >&2)
fi
cd "$WORK"
"$BIN" --version > version
EDGE_PORT=3478
URL="http://$UL_A:8080"

ip netns exec "$NS_A" "$BIN" server --data-dir "$WORK/server" --listen "$UL_A:8080" \
    --edge-udp "$UL_A:$EDGE_PORT" > server.log 2>&1 &
echo $! >> pids
for _ in $(seq 1 100); do
    [[ -s $WORK/server/admin.key ]] && ip netns exec "$NS_A" "$BIN" nodes list \
        --server "$URL" --api-key "$(cat "$WORK/server/admin.key")" >/dev/null 2>&1 && break
    sleep 0.1
done
KEY=$(cat "$WORK/server/admin.key")
TOKEN=$(ip netns exec "$NS_A" "$BIN" token create --reusable --server "$URL" --api-key "$KEY" 2>/dev/null)

if [[ ${TRELLIS_FORCE_RELAY:-0} == 1 ]]; then
    # Inside ns_b only: no UDP to or from node A except with the edge's port.
    ip netns exec "$NS_B" nft -f - <<NFT
table ip trellis_bench {
  chain out { type filter hook output priority 0; ip daddr $UL_A udp dport != $EDGE_PORT drop; }
  chain in { type filter hook input priority 0; ip saddr $UL_A udp sport != $EDGE_PORT drop; }
}
NFT
fi

# --accept-dns=false: the benchmark never touches any resolver configuration.
for side in a b; do
    ns=$NS_A; [[ $side == b ]] && ns=$NS_B
    ip netns exec "$ns" "$BIN" join --server "$URL" --token "$TOKEN" --name "bench-$side" \
        --state-dir "$WORK/node-$side" --accept-dns=false > "node-$side.log" 2>&1 &
    echo $! >> pids
done

overlay_of() { ip -n "$1" -4 -o addr show dev trellis0 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}'; }
for _ in $(seq 1 100); do
    OB=$(overlay_of "$NS_B" || true)
    OA=$(overlay_of "$NS_A" || true)
    [[ -n $OA && -n $OB ]] && break
    sleep 0.1
done
[[ -n ${OB:-} ]] || { echo "node B got no overlay address; see $WORK/node-b.log" >&2; exit 1; }
echo "$OB" > overlay_b
if [[ ${TRELLIS_FORCE_RELAY:-0} == 1 ]]; then
    # Wait until A sees B through the relay (the first packets may go direct and be dropped).
    for _ in $(seq 1 100); do
        ip netns exec "$NS_A" "$BIN" ping bench-b --count 1 --state-dir "$WORK/node-a" 2>/dev/null \
            | grep -q "path=relay-udp" && break
        sleep 0.2
    done
fi
