#!/usr/bin/env bash
# bench/peers-up.sh with the two nodes forced onto the edge's UDP relay.
TRELLIS_FORCE_RELAY=1 exec "$(dirname "${BASH_SOURCE[0]}")/peers-up.sh" "$@"
