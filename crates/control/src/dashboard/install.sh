#!/bin/sh
# Installs the Trellis agent from this Trellis server and joins this machine
# to its network:
#
#   curl -fsSL __SERVER__/install.sh | sudo sh -s -- --token TOKEN [--name NAME] [--state-dir DIR] [JOIN ARGS...]
#
# It downloads the server's own `trellis` binary to ${TRELLIS_PREFIX:-/usr/local}/bin
# and starts `trellis join` in the background: as the systemd unit trellis.service
# when systemd runs this machine (and neither TRELLIS_PREFIX nor TRELLIS_STATE_DIR
# is set), otherwise with nohup, logging to ${TRELLIS_STATE_DIR:-/var/lib/trellis}/agent.log.
# Arguments it does not know are passed on to `trellis join`.
set -eu

SERVER=__SERVER_QUOTED__
PREFIX="${TRELLIS_PREFIX:-/usr/local}"
STATE_DIR="${TRELLIS_STATE_DIR:-/var/lib/trellis}"
TOKEN=""
NAME=""

die() {
    echo "trellis install: $*" >&2
    exit 1
}

# Split our own options from those passed on to `trellis join` (kept in "$@").
count=$#
while [ "$count" -gt 0 ]; do
    arg=$1
    shift
    count=$((count - 1))
    case $arg in
    --token | --name | --state-dir)
        [ "$count" -gt 0 ] || die "$arg needs a value"
        val=$1
        shift
        count=$((count - 1))
        case $arg in
        --token) TOKEN=$val ;;
        --name) NAME=$val ;;
        --state-dir) STATE_DIR=$val ;;
        esac
        ;;
    --token=*) TOKEN=${arg#*=} ;;
    --name=*) NAME=${arg#*=} ;;
    --state-dir=*) STATE_DIR=${arg#*=} ;;
    --) ;;
    *) set -- "$@" "$arg" ;;
    esac
done

[ -n "$TOKEN" ] || [ -f "$STATE_DIR/node.json" ] ||
    die "no join token given: copy the whole command from the dashboard (it ends with --token ...)"

if [ -z "${TRELLIS_PREFIX:-}" ] && [ "$(id -u)" != 0 ]; then
    die "run this as root (curl ... | sudo sh -s -- ...): it installs to $PREFIX/bin and sets up a network interface"
fi

BIN="$PREFIX/bin/trellis"
mkdir -p "$PREFIX/bin" "$STATE_DIR"
TMP="$BIN.download.$$"
trap 'rm -f "$TMP"' EXIT

echo "Downloading trellis from $SERVER ..."
if command -v curl >/dev/null 2>&1; then
    curl -fsSL -o "$TMP" "$SERVER/download/trellis" || die "downloading $SERVER/download/trellis failed"
elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$TMP" "$SERVER/download/trellis" || die "downloading $SERVER/download/trellis failed"
else
    die "neither curl nor wget is installed; install one of them and run this again"
fi
[ -s "$TMP" ] || die "the download from $SERVER/download/trellis was empty"
chmod 755 "$TMP"
# A rename replaces the file even while an older agent runs from it.
mv -f "$TMP" "$BIN"
echo "Installed $BIN"

set -- join --server "$SERVER" ${TOKEN:+--token} ${TOKEN:+"$TOKEN"} \
    ${NAME:+--name} ${NAME:+"$NAME"} --state-dir "$STATE_DIR" "$@"

# Quotes one argument for a systemd ExecStart line.
systemd_quote() {
    printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/%/%%/g' -e 's/\$/$$/g')"
}

if [ -z "${TRELLIS_PREFIX:-}" ] && [ -z "${TRELLIS_STATE_DIR:-}" ] && [ -d /run/systemd/system ]; then
    exec_start=$(systemd_quote "$BIN")
    for a in "$@"; do
        exec_start="$exec_start $(systemd_quote "$a")"
    done
    umask 077
    cat >/etc/systemd/system/trellis.service <<EOF
[Unit]
Description=Trellis mesh VPN agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$exec_start
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
EOF
    chmod 600 /etc/systemd/system/trellis.service
    systemctl daemon-reload
    systemctl enable trellis.service >/dev/null 2>&1 || true
    systemctl restart trellis.service
    echo "Trellis agent started as trellis.service; its log: journalctl -u trellis"
    exit 0
fi

LOG="$STATE_DIR/agent.log"
PIDFILE="$STATE_DIR/agent.pid"
if [ -f "$PIDFILE" ]; then
    old=$(cat "$PIDFILE" 2>/dev/null || true)
    if [ -n "$old" ] && kill -0 "$old" 2>/dev/null; then
        echo "Stopping the agent started before (pid $old)"
        kill "$old" 2>/dev/null || true
        i=0
        while kill -0 "$old" 2>/dev/null && [ "$i" -lt 50 ]; do
            sleep 0.1
            i=$((i + 1))
        done
    fi
fi
if command -v setsid >/dev/null 2>&1; then
    setsid nohup "$BIN" "$@" >>"$LOG" 2>&1 </dev/null &
else
    nohup "$BIN" "$@" >>"$LOG" 2>&1 </dev/null &
fi
pid=$!
echo "$pid" >"$PIDFILE"
sleep 1
if ! kill -0 "$pid" 2>/dev/null; then
    echo "trellis install: the agent stopped right away; the end of its log ($LOG):" >&2
    tail -n 20 "$LOG" >&2 || true
    exit 1
fi
echo "Trellis agent started (pid $pid); its log: $LOG"
echo "This machine shows up in the dashboard within a few seconds."
