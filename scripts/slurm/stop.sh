#!/usr/bin/env bash
# Stop the local cluster that scripts/slurm/start.sh started: only the daemons named in its pid
# files (slurmd, slurmctld, slurmdbd, mariadbd, munged), newest first. Jobs still running are
# cancelled first.
#
#   scripts/slurm/stop.sh              stop every daemon (state and configs are kept: next start is quick)
#   scripts/slurm/stop.sh --only NAME  stop one daemon
#   scripts/slurm/stop.sh --purge      stop, then remove the state directory and the configs we wrote
source "$(dirname "$0")/lib.sh"
need_root

names=(slurmd slurmctld slurmdbd mariadbd munged)
purge=0
case ${1:-} in
    --only) names=("${2:?--only needs a daemon name}") ;;
    --purge) purge=1 ;;
    "") ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) die "unknown argument: $1" ;;
esac

lock
if [[ ${names[*]} == "slurmd slurmctld slurmdbd mariadbd munged" ]] && alive slurmctld; then
    for state in PENDING RUNNING SUSPENDED; do scancel --state="$state" --full --quiet 2>/dev/null || true; done
    wait_for 20 bash -c '[[ -z $(squeue -h -t PD,R,S,CG -o %i) ]]' || log "jobs still listed: $(squeue -h -o %i | tr '\n' ' ')"
fi

for name in "${names[@]}"; do
    alive "$name" || { rm -f "$(pidfile "$name")"; continue; }
    pid=$(<"$(pidfile "$name")")
    kill -TERM "$pid"
    if ! wait_for 20 bash -c "! kill -0 $pid"; then
        log "$name (pid $pid) ignored SIGTERM, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$name")"
    log "stopped $name (pid $pid)"
done

if ((purge)); then
    for conf in slurm.conf gres.conf slurmdbd.conf; do
        if [[ -e $ETC/$conf ]] && grep -qxF "$MARKER" "$ETC/$conf"; then rm -f "$ETC/$conf"; fi
    done
    rm -rf "$STATE"
    log "removed $STATE and the configs written by start.sh"
fi
