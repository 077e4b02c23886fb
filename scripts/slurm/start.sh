#!/usr/bin/env bash
# Start a single-node SLURM cluster on localhost, without systemd:
#   munged, [mariadbd, slurmdbd,] slurmctld, slurmd, each started directly with a pid file under
#   $MEMCTL_SLURM_STATE (default /var/lib/memctl-slurm).
#
#   scripts/slurm/start.sh                  with accounting (slurmdbd + MariaDB: sacct works)
#   scripts/slurm/start.sh --no-accounting  AccountingStorageType=accounting_storage/none (sacct
#                                           fails; use profiles/slurm-noacct)
#
# Idempotent: daemons already running are left alone, unless the generated config changed (e.g.
# switching accounting on or off), in which case the SLURM daemons are restarted. Installs the
# packages first when they are missing (scripts/slurm/install.sh). Needs root.
source "$(dirname "$0")/lib.sh"
need_root

ACCOUNTING=1
for arg in "$@"; do
    case $arg in
        --no-accounting) ACCOUNTING=0 ;;
        --accounting) ACCOUNTING=1 ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument: $arg" ;;
    esac
done

t0=$EPOCHREALTIME
"$SLURM_SCRIPTS/install.sh"
lock

HOST=$(hostname -s)
# munged refuses a group-writable pid directory: the caller's umask (a lab's 002) must not leak in.
umask 022
mkdir -p "$STATE"/{run,log,slurmctld,slurmd} "$ETC"
chmod 0755 "$STATE" "$STATE"/{run,log,slurmctld,slurmd}
install -d -o munge -g munge -m 0755 /run/munge "$STATE/run/munge"
install -d -o munge -g munge -m 0700 "$STATE/log/munge"

# --- configs -------------------------------------------------------------------------------------
# The node line from the hardware slurmd sees (CPUs, sockets, cores, RealMemory).
NODE_HW=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //')
[[ -f $STATE/dbpass ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$STATE/dbpass")
DB_PASS=$(<"$STATE/dbpass")
if ((ACCOUNTING)); then
    ACCT_CONF='JobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=30\nAccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\nAccountingStorageTRES=gres/gpu\n# sacct shows the comment (the plugin puts the rule name there)\nAccountingStoreFlags=job_comment'
else
    ACCT_CONF='JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none'
fi

render() {  # render TEMPLATE DEST MODE -> returns 0 when DEST changed
    local tmp
    tmp=$(mktemp)
    sed -e "s|@MARKER@|$MARKER|" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" \
        -e "s|@STATE@|$STATE|g" -e "s|@MIN_JOB_AGE@|$MIN_JOB_AGE|g" -e "s|@ACCOUNTING@|$ACCT_CONF|" \
        -e "s|@NODE_HW@|$NODE_HW|g" -e "s|@GPU_TYPE@|$GPU_TYPE|g" -e "s|@PARTITION@|$PARTITION|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_USER@|$DB_USER|g" -e "s|@DB_PASS@|$DB_PASS|g" \
        -e "s|@DB_NAME@|$DB_NAME|g" "$SLURM_SCRIPTS/$1" >"$tmp"
    if [[ -e $2 ]] && ! grep -qxF "$MARKER" "$2"; then
        rm -f "$tmp"
        die "$2 exists and was not written by these scripts; move it away first"
    fi
    if [[ -e $2 ]] && cmp -s "$tmp" "$2"; then
        rm -f "$tmp"
        return 1
    fi
    install -m "$3" "$tmp" "$2"
    rm -f "$tmp"
    return 0
}
changed=0
render slurm.conf.in "$ETC/slurm.conf" 0644 && changed=1
render gres.conf.in "$ETC/gres.conf" 0644 && changed=1
render slurmdbd.conf.in "$ETC/slurmdbd.conf" 0600 || true

# Start a daemon unless its pid file names a live one; wait until it is up.
launch() {  # launch [--bg] NAME CMD...  (--bg: the command does not daemonize itself)
    local bg=0 name
    if [[ $1 == --bg ]]; then bg=1; shift; fi
    name=$1; shift
    if alive "$name"; then return 0; fi
    rm -f "$(pidfile "$name")"
    # 9>&-: the daemon must not keep the start/stop lock open.
    if ((bg)); then setsid "$@" </dev/null >/dev/null 2>&1 9>&- & else "$@" 9>&-; fi
    wait_for 20 test -s "$(pidfile "$name")" || die "$name did not start (logs in $STATE/log)"
    log "started $name (pid $(<"$(pidfile "$name")"))"
}

stop_daemon() {  # stop_daemon NAME
    "$SLURM_SCRIPTS/stop.sh" --only "$1"
}

# --- munge -----------------------------------------------------------------------------------------
[[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
launch munged runuser -u munge -- /usr/sbin/munged --pid-file="$(pidfile munged)" \
    --log-file="$STATE/log/munge/munged.log"
wait_for 10 bash -c 'munge -n | unmunge' || die "munge does not work (see $STATE/log/munge/munged.log)"

# --- accounting: MariaDB + slurmdbd ----------------------------------------------------------------
MYSQL_SOCK="$STATE/run/mysqld/mysqld.sock"
MYSQL_OPTS=(--no-defaults --datadir="$STATE/mysql" --innodb-log-file-size=16M --innodb-buffer-pool-size=128M
    --innodb-lock-wait-timeout=900)
if ((ACCOUNTING)); then
    install -d -o mysql -g mysql -m 0755 "$STATE/run/mysqld"
    if [[ ! -d $STATE/mysql/mysql ]]; then
        install -d -o mysql -g mysql -m 0700 "$STATE/mysql"
        mariadb-install-db "${MYSQL_OPTS[@]}" --user=mysql --auth-root-authentication-method=socket \
            --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
    fi
    launch --bg mariadbd /usr/sbin/mariadbd "${MYSQL_OPTS[@]}" --user=mysql --bind-address=127.0.0.1 \
        --port="$DB_PORT" --socket="$MYSQL_SOCK" --pid-file="$(pidfile mariadbd)" \
        --log-error="$STATE/log/mariadb.log"
    wait_for 30 mariadb-admin --socket="$MYSQL_SOCK" ping || die "mariadbd does not answer (see $STATE/log/mariadb.log)"
    mariadb --socket="$MYSQL_SOCK" -u root <<SQL
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
SQL
    launch slurmdbd slurmdbd
    wait_for 30 sacctmgr -n list cluster || die "slurmdbd does not answer (see $STATE/log/slurmdbd.log)"
    # The cluster, the profile's account, and root (+ the sudo user) in that account.
    if ! sacctmgr -n -P list cluster format=cluster | grep -qxF "$CLUSTER"; then
        sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null
    fi
    if ! sacctmgr -n -P list account format=account | grep -qxF "$ACCOUNT"; then
        sacctmgr -i -Q add account "$ACCOUNT" Cluster="$CLUSTER" Description="memctl test lab" Organization=memctl >/dev/null
    fi
    for user in root ${SUDO_USER:-} ${MEMCTL_SLURM_USERS:-}; do
        if ! sacctmgr -n -P list assoc user="$user" account="$ACCOUNT" format=user | grep -qxF "$user"; then
            sacctmgr -i -Q add user "$user" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
        fi
    done
else
    # A cluster without accounting: our slurmdbd and MariaDB are not running.
    stop_daemon slurmdbd
    stop_daemon mariadbd
fi

# --- slurmctld + slurmd ----------------------------------------------------------------------------
if ((changed)); then
    stop_daemon slurmd
    stop_daemon slurmctld
fi
launch slurmctld slurmctld
wait_for 30 scontrol ping || die "slurmctld does not answer (see $STATE/log/slurmctld.log)"
launch slurmd slurmd
node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null; }
wait_for 30 bash -c "sinfo -h -N -n '$HOST' -o %T | grep -qvE 'unknown|down|drain|not_responding|^$'" || {
    # A node left drained or down by an earlier run returns to service.
    scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
    wait_for 20 bash -c "sinfo -h -N -n '$HOST' -o %T | grep -qE '^(idle|mixed|allocated)'" ||
        die "node $HOST is $(node_state) (see $STATE/log/slurmd.log)"
}
echo $((ACCOUNTING)) >"$STATE/accounting"
log "cluster $CLUSTER up on $HOST: partition $PARTITION, gres gpu:$GPU_TYPE:2," \
    "accounting $( ((ACCOUNTING)) && echo "on (account $ACCOUNT)" || echo off), node $(node_state)," \
    "$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $t0 }") s"
