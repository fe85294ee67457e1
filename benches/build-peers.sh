#!/usr/bin/env bash
# Build the peers the benchmarks compare against into benches/peers
# (gitignored, never committed): rathole (about 7 minutes; it fails with
# --locked on this rustc, so it is built without) and bore (about 2).
#   benches/build-peers.sh [rathole] [bore]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=$ROOT/benches/peers
mkdir -p "$DEST"
want=${*:-rathole bore}
for p in $want; do
  case $p in
    rathole)
      if [ -x "$DEST/bin/rathole" ]; then echo "rathole: already built"; continue; fi
      echo "building rathole into $DEST (about 7 minutes)"
      cargo install rathole --root "$DEST"
      ;;
    bore)
      if [ -x "$DEST/bin/bore" ]; then echo "bore: already built"; continue; fi
      echo "building bore into $DEST (about 2 minutes)"
      cargo install --locked bore-cli --root "$DEST"
      ;;
    *) echo "unknown peer: $p (rathole, bore)" >&2; exit 2 ;;
  esac
done
ls -l "$DEST/bin"
