# Shared settings of scripts/slurm/{install,start,stop}.sh (sourced, not run).
#
# Everything the local cluster writes lives under $MEMCTL_SLURM_STATE (pid files, logs, spool,
# controller state, the MariaDB data directory); the SLURM configs go to /etc/slurm (where the
# SLURM commands look for them) and carry a marker line, so a config we did not write is never
# overwritten.
set -euo pipefail

# The daemons and sacctmgr live in /usr/sbin, which a non-login root shell (CI, cron) may not have.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

SLURM_SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STATE="${MEMCTL_SLURM_STATE:-/var/lib/memctl-slurm}"
ETC="${MEMCTL_SLURM_ETC:-/etc/slurm}"
CLUSTER="${MEMCTL_SLURM_CLUSTER:-memctl}"
# Must match profiles/slurm/config.yaml (slurm_partition, slurm_account, gpu_model).
PARTITION="${MEMCTL_SLURM_PARTITION:-gpu}"
ACCOUNT="${MEMCTL_SLURM_ACCOUNT:-lab}"
GPU_TYPE="${MEMCTL_SLURM_GPU_TYPE:-fake}"
# >= 3x the profile's slurm-init-seconds-before-status-checks, so squeue still sees finished jobs.
MIN_JOB_AGE="${MEMCTL_SLURM_MIN_JOB_AGE:-600}"
DB_PORT="${MEMCTL_SLURM_DB_PORT:-13306}"
DB_NAME=slurm_acct_db
DB_USER=slurm
MARKER="# written by memctl scripts/slurm (safe to overwrite)"
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)

log() { printf '[slurm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() { [[ $(id -u) -eq 0 ]] || die "run as root"; }

# Where each daemon writes its pid (munged and mariadbd run as their own users, in their own dirs).
pidfile() {  # pidfile NAME
    case $1 in
        munged) echo "$STATE/run/munge/munged.pid" ;;
        mariadbd) echo "$STATE/run/mysqld/mariadbd.pid" ;;
        *) echo "$STATE/run/$1.pid" ;;
    esac
}

# A pid file names a live process of the expected program.
alive() {  # alive NAME
    local pidfile pid
    pidfile=$(pidfile "$1")
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -d /proc/$pid ]] || return 1
    # A recycled pid that now belongs to another program does not count.
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qw -- "$1"
}

# Wait up to $2 seconds for a command to succeed.
wait_for() {  # wait_for SECONDS CMD...
    local limit=$1 i; shift
    for ((i = 0; i < limit * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    return 1
}

# One start/stop at a time (two test sessions may start the cluster at once). The stop.sh that
# start.sh runs inherits the lock.
lock() {
    [[ -n ${MEMCTL_SLURM_LOCKED:-} ]] && return 0
    mkdir -p "$STATE"
    exec 9>"$STATE/lock"
    flock -w 300 9 || die "another start/stop holds $STATE/lock"
    export MEMCTL_SLURM_LOCKED=1
}
