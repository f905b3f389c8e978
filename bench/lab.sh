# Shared by the namespace benchmarks (sourced, not run): checks root and
# tools, prints the machine, builds the release binary unless TRELLIS_BIN is
# given, and brings up four namespaces — a switch (bridge br0) joining the
# server S on 198.18.0.1, node A on 198.18.0.2 and node B on 198.18.0.3 —
# with `trellis server` in S and one `trellis join` agent in A and B, until A
# pings B over the overlay. Everything is removed on exit, whatever happens.
#
# The caller sets NAME (for messages), TOOLS (commands it needs),
# TOOL_VERSION (a line for the machine summary, may be empty) and
# SERVER_EXTRA (an array of extra `trellis server` flags), then sources this.
# Afterwards: NS_S/NS_A/NS_B, in_s/in_a/in_b, WORK, PIDS, URL, KEY, TOKEN,
# IP_UA/IP_UB (underlay), IP_A/IP_B (overlay), TRELLIS_BIN, ROOT, TIME.

if [[ $(id -u) -ne 0 ]]; then
    echo "$NAME: must run as root (network namespaces, TUN)" >&2
    exit 1
fi
for tool in $TOOLS; do
    command -v "$tool" >/dev/null || { echo "$NAME: $tool is required" >&2; exit 1; }
done

TIME=${TIME:-10}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

echo "== machine"
echo "nproc:  $(nproc)"
echo "cpu:    $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "kernel: $(uname -srm)"
[[ -n ${TOOL_VERSION:-} ]] && echo "$TOOL_VERSION"

if [[ -z ${TRELLIS_BIN:-} ]]; then
    echo "== building trellis (release)"
    (cd "$ROOT" && cargo build --release -p trellis)
    TRELLIS_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/trellis"
fi
[[ -x $TRELLIS_BIN ]] || { echo "$NAME: $TRELLIS_BIN is not executable" >&2; exit 1; }
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
    --edge-udp 198.18.0.1:3478 "${SERVER_EXTRA[@]}" >"$WORK/server.log" 2>&1 &
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

