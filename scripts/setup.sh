#!/usr/bin/env bash
# Installs what gpud's demo and test suite need on a fresh Debian machine (run as root):
# Debian packages (serf, nftables, iproute2, rpm tooling, systemd-nspawn, debootstrap) and a
# virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# systemd-container and debootstrap: the real-systemd test boots a Debian 12 root with the deb.
packages=(serf nftables iproute2 procps rpm dpkg-dev python3 python3-venv systemd
  systemd-container debootstrap)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test,ray]'
