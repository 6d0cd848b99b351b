#!/usr/bin/env bash
# scripts/apt-ensure.sh PKG...: installs those of the Debian packages PKG that are missing, with
# sudo unless run as root, and says which. Exits 1 with apt-get's output if it fails.
# Used by scripts/setup.sh and tests/scheduler/run.sh.
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
echo "installing Debian packages: ${missing[*]}" >&2
sudo_cmd=()
[[ $(id -u) == 0 ]] || sudo_cmd=(sudo)
aptlog="$(mktemp)"
trap 'rm -f "$aptlog"' EXIT
if ! { "${sudo_cmd[@]}" apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
  >"$aptlog" 2>&1; then
  cat "$aptlog" >&2
  echo "apt-get could not install ${missing[*]} (output above)" >&2
  exit 1
fi
