#!/usr/bin/env bash
# Installs what gpud's demo and test suite need on a fresh Debian machine (run as root):
# Debian packages (serf, nftables, iproute2, rpm tooling, systemd-nspawn, debootstrap) and a
# virtualenv in .venv from scripts/requirements.lock.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# systemd-container and debootstrap: the real-systemd test boots a Debian 12 root with the deb.
# prometheus: promtool checks the shipped alert rules, and a real Prometheus scrapes gpuds in
# the namespace harness (the tests start it themselves; its own service is never used).
# zsh and fish: the shell completions the packages install are tested in the real shells.
packages=(serf nftables iproute2 procps rpm dpkg-dev python3 python3-venv systemd
  systemd-container debootstrap prometheus zsh fish)
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
# Exactly the tested versions, each file checked by its hash (a machine that already has other
# versions gets these); `python3 packaging/build.py --update-lock` moves the lock forward.
.venv/bin/python -m pip install -q --require-hashes -r scripts/requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -m pip check
