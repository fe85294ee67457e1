#!/usr/bin/env bash
# Installs (with apt-get, only what is missing) the real clients and servers
# the tests drive, then runs every test target.
#   scripts/test.sh             install what is missing, then cargo test
#   scripts/test.sh --deps-only install what is missing, nothing else
# Runs unattended: as root (or with sudo), no stdin needed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  proxytunnel openssh-server openssh-client putty-tools curl socat
  iproute2 libnss3-tools chromium ca-certificates
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "test.sh: installing ${missing[*]}"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then SUDO=(sudo -n); fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 update -q </dev/null
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends \
    "${missing[@]}" </dev/null
fi

# The sshd package may leave an sshd running from its postinst on some
# machines; the tests never use it (they start sshd -i themselves).

if [[ ${1:-} == --deps-only ]]; then
  exit 0
fi

if [[ -d $HOME/.cargo/bin ]]; then PATH="$HOME/.cargo/bin:$PATH"; fi
export RUST_BACKTRACE=1
exec cargo test --all-targets </dev/null
