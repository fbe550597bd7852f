#!/usr/bin/env bash
# Install the Debian packages needed for the lintrans single-node SLURM test
# cluster (see slurm/README.md). Idempotent: when every package is already
# installed, apt is not touched at all.
set -euo pipefail

PACKAGES=(
  munge
  slurmctld
  slurmd
  slurm-client
  slurmdbd
  slurm-wlm-basic-plugins
  mariadb-server
  mariadb-client
  openmpi-bin
  libopenmpi-dev
  libpmix2
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install_system_packages: all ${#PACKAGES[@]} packages already installed"
  exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
  echo "install_system_packages: must run as root to install: ${missing[*]}" >&2
  exit 1
fi

echo "install_system_packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
aptlog="$(mktemp /tmp/lintrans-apt-log.XXXXXX)"
# policy-rc.d keeps the packages' postinst scripts from starting the system
# daemons (munge, mariadb, slurm*): slurm/cluster.sh runs its own copies.
policy=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
  if [[ "$created_policy" -eq 1 ]]; then
    rm -f "$policy"
  fi
  rm -f "$aptlog"
}
trap cleanup EXIT
fail() {
  echo "install_system_packages: $1 failed; last lines of its output:" >&2
  tail -n 40 "$aptlog" >&2
  exit 1
}
if [[ ! -e "$policy" ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 0755 "$policy"
  created_policy=1
fi
apt-get update -qq >"$aptlog" 2>&1 || fail "apt-get update"
apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$aptlog" 2>&1 ||
  fail "apt-get install"
echo "install_system_packages: done"
