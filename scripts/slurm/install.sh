#!/usr/bin/env bash
# Install the Debian 12 packages of a single-node SLURM cluster with accounting:
#   munge, slurmctld, slurmd, slurm-client, slurmdbd, mariadb-server.
# Idempotent (does nothing when they are installed); needs root and apt. Services are NOT started
# by the packages (no systemd needed): scripts/slurm/start.sh starts the daemons itself.
source "$(dirname "$0")/lib.sh"
need_root
command -v apt-get >/dev/null || die "apt-get not found: this script is for Debian 12"

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
    log "packages already installed: ${PACKAGES[*]}"
    exit 0
fi

log "installing ${missing[*]}"
# Keep the packages' maintainer scripts from starting services (invoke-rc.d asks policy-rc.d);
# an existing policy-rc.d is left as it was.
own_policy=""
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
fi
trap '[[ -n $own_policy ]] && rm -f /usr/sbin/policy-rc.d' EXIT
export DEBIAN_FRONTEND=noninteractive
# apt-get update only when the package lists are missing or more than a day old.
if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mtime -1 2>/dev/null | head -1) ]]; then
    apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
log "installed: $(dpkg-query -W -f='${Package} ${Version}\n' slurmctld mariadb-server | tr '\n' ' ')"
