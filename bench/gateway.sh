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

NAME=gateway.sh
TOOLS="ip wrk nginx curl ping"
TOOL_VERSION="wrk:    $(wrk --version 2>&1 | head -1 || true)"
SERVER_EXTRA=(--gateway-listen 198.18.0.1:8443)
# shellcheck source=bench/lab.sh
source "$(dirname "${BASH_SOURCE[0]}")/lab.sh"

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
