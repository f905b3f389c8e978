#!/usr/bin/env bash
# Runs the side-by-side benchmark harness (../shared/peers, or PEERS_DIR) with
# Trellis — direct and forced through the relay — next to the raw veth and
# the other tunnels, and prints its summary table.
#
#   sudo bench/peers.sh                    # all peers the harness knows, 3 rounds (~15 min)
#   sudo bench/peers.sh veth boringtun     # a subset (Trellis is always added)
#   PB_ROUNDS=5 sudo bench/peers.sh        # harness knobs pass through
#
# The peers must be installed once with "$PEERS_DIR/setup.sh".
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS_DIR=${PEERS_DIR:-$REPO/../shared/peers}
[[ -x $PEERS_DIR/run-all.sh ]] || {
    echo "no benchmark harness at $PEERS_DIR (set PEERS_DIR to the peers directory)" >&2
    exit 64
}
(cd "$REPO" && cargo build --release -p trellis)
export TRELLIS_BIN=${TRELLIS_BIN:-$REPO/target/release/trellis}
peers=("$@")
[[ ${#peers[@]} -gt 0 ]] || peers=(veth nebula boringtun gotatun wireguard-go tinc)
exec "$PEERS_DIR/run-all.sh" "${peers[@]}" \
    "trellis=$REPO/bench/peers-up.sh" "trellis-relay=$REPO/bench/peers-up-relay.sh"
