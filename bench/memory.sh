#!/usr/bin/env bash
# Resident memory of a node agent with many peers, at rest and under load.
#
#   sudo bench/memory.sh            # PEERS=100 TIME=10
#
# Starts a server and two real agents (A and B) in namespaces of their own
# (prefix trm-, underlay 198.18.0.0/24), enrolls PEERS-1 more nodes through
# the API (keys made here; they never come online, but every one is a peer in
# A's network map with its own WireGuard session state), then prints A's RSS
# at rest, and again at the end of an iperf3 run from A to B.
set -euo pipefail
[[ $(id -u) == 0 ]] || { echo "run as root (namespaces, TUN)" >&2; exit 1; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${PEERS:-100}
TIME=${TIME:-10}
if [[ -z ${TRELLIS_BIN:-} ]]; then
    (cd "$REPO" && cargo build --release -p trellis)
    TRELLIS_BIN=$REPO/target/release/trellis
fi
P="trm-$$"
S=$P-s A=$P-a B=$P-b
WORK=$(mktemp -d /tmp/trellis-mem.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for n in $S $A $B $P-sw; do ip netns del "$n" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
ip netns add $P-sw
ip -n $P-sw link add br0 type bridge
ip -n $P-sw link set br0 up
i=0
for h in "$S:1" "$A:2" "$B:3"; do
    ns=${h%%:*} last=${h##*:}
    i=$((i + 1))
    ip netns add "$ns"
    ip -n $P-sw link add "p$i" type veth peer name eth0 netns "$ns"
    ip -n $P-sw link set "p$i" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    ip -n "$ns" addr add "198.18.0.$last/24" dev eth0
done
URL=http://198.18.0.1:8080
ip netns exec $S "$TRELLIS_BIN" server --data-dir "$WORK/server" --listen 198.18.0.1:8080 \
    --edge-udp 198.18.0.1:3478 >"$WORK/server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do [[ -s $WORK/server/admin.key ]] && break; sleep 0.1; done
sleep 0.5
KEY=$(cat "$WORK/server/admin.key")
TOKEN=$(ip netns exec $S "$TRELLIS_BIN" token create --reusable --ttl 1h --server $URL --api-key "$KEY" 2>/dev/null)
for n in $(seq 3 "$PEERS"); do
    pub=$(head -c 32 /dev/urandom | base64)
    ip netns exec $S curl -sf -o /dev/null -X POST "$URL/api/v1/enroll" -H 'content-type: application/json' \
        -d "{\"token\":\"$TOKEN\",\"public_key\":\"$pub\",\"name\":\"idle-$n\"}"
done
for side in a b; do
    ns=$A; [[ $side == b ]] && ns=$B
    ip netns exec "$ns" "$TRELLIS_BIN" join --server $URL --token "$TOKEN" --name "mem-$side" \
        --state-dir "$WORK/$side" --accept-dns=false >"$WORK/node-$side.log" 2>&1 &
    PIDS+=($!)
done
AGENT=${PIDS[1]}
for _ in $(seq 1 100); do
    n=$(ip netns exec $A "$TRELLIS_BIN" status --json --state-dir "$WORK/a" 2>/dev/null \
        | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))' 2>/dev/null || echo 0)
    [[ $n -ge $((PEERS - 1)) ]] && break
    sleep 0.2
done
echo "peers in A's map: $n"
OB=$(ip -n $B -4 -o addr show dev trellis0 | awk '{split($4, a, "/"); print a[1]}')
ip netns exec $A ping -c 3 -i 0.2 -q "$OB" >/dev/null
sleep 2
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2 / 1024}' "/proc/$1/status"; }
echo "agent RSS at rest with $n peers: $(rss "$AGENT")"
ip netns exec $B iperf3 -s -1 -D >/dev/null
sleep 0.3
ip netns exec $A iperf3 -c "$OB" -t "$TIME" >/dev/null &
IPERF=$!
sleep $((TIME - 1))
echo "agent RSS under load (iperf3 TCP): $(rss "$AGENT")"
wait $IPERF || true
