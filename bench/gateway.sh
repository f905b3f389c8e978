#!/usr/bin/env bash
# Fetch-gateway benchmark: HTTP requests per second and latency of a small
# page on a private node, fetched (1) directly over the mesh from another
# node and (2) through the edge's fetch gateway by an agent with a binding
# (the plain form: Trellis-Target header; what serverless runtimes use).
#
# Four network namespaces: a switch (bridge br0) joining the server S on
# 198.18.0.1, node A (the client, 198.18.0.2) and node B (nginx serving a
# 612-byte page, 198.18.0.3). wrk runs in A: against B's overlay address
# (direct path), then against the gateway on 198.18.0.1:8443 with the
# binding. One connection (latency) and 32 connections (throughput).
# Nothing is created in, or sent from, the root namespace.
#
# Usage: sudo bench/gateway.sh        (TIME=10 seconds per run)
#        TRELLIS_BIN=target/release/trellis bench/gateway.sh
set -euo pipefail

for arg in "$@"; do
    case $arg in
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gateway.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "gateway.sh: must run as root (network namespaces, TUN)" >&2
    exit 1
fi
TOOLS="ip wrk nginx curl ping"
for tool in $TOOLS; do
    command -v "$tool" >/dev/null || { echo "gateway.sh: $tool is required" >&2; exit 1; }
done

TIME=${TIME:-10}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

echo "== machine"
echo "nproc:  $(nproc)"
echo "cpu:    $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
echo "kernel: $(uname -srm)"
echo "wrk:    $(wrk --version 2>&1 | head -1)"

if [[ -z ${TRELLIS_BIN:-} ]]; then
    echo "== building trellis (release)"
    (cd "$ROOT" && cargo build --release -p trellis)
    TRELLIS_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/trellis"
fi
[[ -x $TRELLIS_BIN ]] || { echo "gateway.sh: $TRELLIS_BIN is not executable" >&2; exit 1; }
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
WORK=$(mktemp -d /tmp/trellis-gwbench.XXXXXX)
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
    --edge-udp 198.18.0.1:3478 --gateway-listen 198.18.0.1:8443 >"$WORK/server.log" 2>&1 &
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


echo "== nginx on bench-b ($IP_B:80)"
mkdir -p "$WORK/www"
head -c 612 /dev/zero | tr '\0' 'x' >"$WORK/www/index.html"
truncate -s 1G "$WORK/www/1g.bin"   # sparse: costs no disk
cat >"$WORK/nginx.conf" <<CONF
daemon off;
user root;
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx-tmp;
    proxy_temp_path $WORK/nginx-tmp;
    fastcgi_temp_path $WORK/nginx-tmp;
    uwsgi_temp_path $WORK/nginx-tmp;
    scgi_temp_path $WORK/nginx-tmp;
    server { listen 80; root $WORK/www; keepalive_requests 1000000; }
}
CONF
mkdir -p "$WORK/nginx-tmp"
in_b nginx -c "$WORK/nginx.conf" >"$WORK/nginx.log" 2>&1 &
PIDS+=($!)
for i in $(seq 50); do
    in_b curl -sf -m 1 http://127.0.0.1/ >/dev/null && break
    [[ $i -eq 50 ]] && { echo "nginx did not start" >&2; exit 1; }
    sleep 0.1
done

MESH=$(in_s "$TRELLIS_BIN" binding create bench --server "$URL" --api-key "$KEY")
CRED=${MESH#*://}; CRED=${CRED%@*}
GW=${MESH##*@}
echo "gateway: $GW (binding bench)"
for i in $(seq 100); do
    code=$(in_a curl -s -o /dev/null -w '%{http_code}' -m 5 --proxy "$MESH" "http://bench-b.default.mesh/" || true)
    [[ $code == 200 ]] && break
    [[ $i -eq 100 ]] && { echo "the gateway did not reach bench-b (last status $code)" >&2; exit 1; }
    sleep 0.2
done

run_wrk() { # label connections url [headers...]
    local label=$1 conns=$2 url=$3; shift 3
    local hdrs=()
    for h in "$@"; do hdrs+=(-H "$h"); done
    in_a wrk -t 1 -c "$conns" -d "${TIME}s" --latency "${hdrs[@]}" "$url" >"$WORK/wrk-$label.txt" 2>&1
    local rps p50 p99 errs
    rps=$(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk-$label.txt")
    p50=$(awk '$1 == "50%" {print $2}' "$WORK/wrk-$label.txt")
    p99=$(awk '$1 == "99%" {print $2}' "$WORK/wrk-$label.txt")
    errs=$(awk '/Non-2xx|Socket errors/ {print}' "$WORK/wrk-$label.txt" | tr '\n' ' ')
    printf '%-34s %6s  %12s  %9s  %9s  %s\n' "$label" "$conns" "$rps" "$p50" "$p99" "$errs"
}

echo "== wrk ${TIME}s per run from bench-a"
printf '%-34s %6s  %12s  %9s  %9s\n' "path" "conns" "requests/s" "p50" "p99"
run_wrk "direct over the mesh" 1 "http://$IP_B/"
run_wrk "through the gateway (plain form)" 1 "http://$GW/fetch" \
    "Trellis-Target: http://bench-b.default.mesh/" "Trellis-Binding: $CRED"
run_wrk "direct over the mesh" 32 "http://$IP_B/"
run_wrk "through the gateway (plain form)" 32 "http://$GW/fetch" \
    "Trellis-Target: http://bench-b.default.mesh/" "Trellis-Binding: $CRED"
SERVER_PID=$(pgrep -f "server --data-dir $WORK/server" | head -1)
rss() { awk -v k="$1" '$1 == k":" {printf "%.1f MiB", $2 / 1024}' "/proc/$SERVER_PID/status"; }
echo "server RSS after the wrk runs: $(rss VmRSS) (peak so far $(rss VmHWM))"

echo "== 1 GiB download through the gateway (forward proxy), from bench-a"
START=$(date +%s.%N)
in_a curl -sS --proxy "$MESH" -o /dev/null -w '%{size_download} bytes, %{speed_download} B/s\n' \
    "http://bench-b.default.mesh/1g.bin" >"$WORK/dl.txt"
END=$(date +%s.%N)
awk -v s="$START" -v e="$END" '{printf "%s (%.1f MB/s over %.1f s)\n", $0, $1 / (e - s) / 1e6, e - s}' "$WORK/dl.txt"
echo "server RSS after the download: $(rss VmRSS) (peak $(rss VmHWM))"
