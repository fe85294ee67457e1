#!/usr/bin/env bash
# Check Cargo.lock against the RustSec advisory database, offline.
#   scripts/audit.sh [ADVISORY_DB_DIR]   (default: ../shared/advisory-db)
# cargo-audit wants a git repository, so the snapshot is copied into a
# throwaway one first. Installs cargo-audit from crates.io if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
db_src=${1:-../shared/advisory-db}
if [[ ! -d $db_src ]]; then
  echo "audit.sh: no advisory database at $db_src" >&2
  exit 2
fi
if ! command -v cargo-audit >/dev/null 2>&1; then
  cargo install cargo-audit --locked
fi
db=$(mktemp -d)
trap 'rm -rf "$db"' EXIT
cp -r "$db_src"/. "$db"/
git -C "$db" init -q
git -C "$db" add -A
git -C "$db" -c user.name=audit -c user.email=audit@localhost commit -qm snapshot
exec cargo audit --no-fetch --db "$db" --file Cargo.lock "${@:2}"
