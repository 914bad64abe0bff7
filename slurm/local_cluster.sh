#!/usr/bin/env bash
# A throw-away two-node SLURM cluster on this one host, for tests and for trying slurm/train.sbatch.
#
#   slurm/local_cluster.sh install      apt-install slurm (slurmctld, slurmd, client) and munge if missing
#   slurm/local_cluster.sh start DIR    write configs under DIR, start munged, slurmctld and two slurmd
#   slurm/local_cluster.sh stop DIR     cancel its jobs, stop its daemons (DIR is kept; `rm -rf` it yourself)
#   slurm/local_cluster.sh status DIR   exit 0 when the cluster in DIR is up (both nodes idle/usable)
#   slurm/local_cluster.sh env DIR      print the environment a client needs
#
# `start` ends by printing `export SLURM_CONF=DIR/etc/slurm.conf` (also written to DIR/env.sh):
#   eval "$(slurm/local_cluster.sh start /tmp/mycluster)"; sbatch --nodes 2 slurm/train.sbatch ...
#
# Needs root (the daemons run as root, SlurmUser=root) and Debian/Ubuntu's slurm-wlm (22.05 on bookworm).
# What it sets up, and why:
#   * Two nodes n1 and n2, each a `slurmd -N nX` on this host with its own port, spool dir and log. Debian's
#     slurmd honours -N with per-node Port= (checked on 22.05.8), so a 2-node job with one task per node
#     really gets two slurmstepd/task trees on one machine. n1 and n2 are added to /etc/hosts as aliases of
#     127.0.0.1 (idempotent, one tagged line) because jobs use the node names as addresses (MASTER_ADDR).
#   * CPUs=2 per node (what the host has), cons_tres + CR_CPU, no memory accounting, and OverSubscribe=FORCE:4:
#     up to 4 jobs share each CPU, so up to 8 one-CPU jobs run at once per node and tests running in parallel
#     (pytest-xdist, two sessions) do not queue behind each other. A 2-node job takes one CPU on each node.
#   * ProctrackType=proctrack/linuxproc, TaskPlugin=task/none: no cgroups needed (containers, gVisor). linuxproc
#     tracks a step's processes by their parent chain, so `scancel --signal`, the time-limit signal and the
#     kill on requeue/cancel reach processes that left the task's session: torch's elastic agent starts each
#     worker with start_new_session=True, which proctrack/pgid would miss.
#   * KillWait=30 (SIGTERM then 30 s then SIGKILL, as on most clusters), MinJobAge=120 (a finished job stays
#     in `scontrol show job` for ~2 min: there is no accounting database), JobRequeue=1.
#   * Unique per DIR: ClusterName, ports and FirstJobId come from a slot 0..15 picked from a hash of DIR, moving
#     on to the next slot while a port is taken. The slot also spaces job ids by 1000 so two clusters on one host
#     do not hand out the same ids (train.sbatch derives the rendezvous port from the job id). Several clusters
#     in different DIRs can run at once; tests share one per user (tests/slurm_helpers.py, under a file lock).
#   * DIR should be short: munge's unix socket path (DIR/munge/munge.socket) must stay under 108 bytes.
#
# Requeued jobs wait for their BeginTime; `scontrol update JobId=ID StartTime=now+2` releases one (not `now`:
# a restart within the second of the requeue can be refused, "Job credential revoked").
set -euo pipefail

NODES=(n1 n2)
CPUS_PER_NODE=2
HOSTS_TAG="# distrain-local-slurm"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

have_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null
}

cmd_install() {
    if have_slurm; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "install needs root (apt-get)"
    command -v apt-get >/dev/null || die "install needs apt-get (Debian/Ubuntu)"
    export DEBIAN_FRONTEND=noninteractive
    local out
    # Only run `apt-get update` when the package lists do not know slurmd yet (a fresh image).
    if ! apt-cache show slurmd >/dev/null 2>&1; then
        out=$(apt-get update -qq 2>&1) || { echo "$out" >&2; die "apt-get update failed"; }
    fi
    out=$(apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge 2>&1) \
        || { echo "$out" >&2; die "apt-get install slurmctld slurmd slurm-client munge failed"; }
    have_slurm || die "slurm still missing after apt-get install"
}

abs_dir() {
    [ -n "${1:-}" ] || die "missing DIR"
    mkdir -p "$1"
    (cd "$1" && pwd -P)
}

# Is something listening on 127.0.0.1:$1?
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

add_hosts() {
    local want="127.0.0.1 ${NODES[*]} $HOSTS_TAG"
    if grep -qxF "$want" /etc/hosts 2>/dev/null; then
        return 0
    fi
    local n ok=1
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null || ok=0
    done
    [ "$ok" = 1 ] && return 0   # already resolvable some other way
    if ! { echo "$want" >>/etc/hosts; } 2>/dev/null; then
        echo "local_cluster.sh: warning: cannot add '${NODES[*]}' to /etc/hosts; jobs that use node names as addresses will fail" >&2
    fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local t=$1 what=$2
    shift 2
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$end" ]; then
            echo "local_cluster.sh: timed out waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

nodes_up() {
    # Every node answers and is usable: idle, mix, alloc or comp(leting); not down, drained, unknown or
    # not responding (a trailing '*').
    local out
    out=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
    [ "$(echo "$out" | grep -cE ' (idle|mix|alloc|comp)$')" -eq "${#NODES[@]}" ]
}

cmd_env() {
    local dir
    dir=$(abs_dir "$1")
    echo "export SLURM_CONF=$dir/etc/slurm.conf"
}

cmd_status() {
    local dir
    dir=$(abs_dir "$1")
    [ -f "$dir/etc/slurm.conf" ] || return 1
    export SLURM_CONF=$dir/etc/slurm.conf
    pid_alive "$dir/run/slurmctld.pid" && nodes_up
}

write_conf() {  # write_conf DIR SLOT
    local dir=$1 slot=$2 base=$((61000 + $2 * 8))
    local name
    name="dt$(printf '%s' "$dir" | cksum | cut -d' ' -f1)"
    name=${name:0:12}
    {
        echo "# Written by slurm/local_cluster.sh for $dir (slot $slot). Regenerated on every start."
        echo "ClusterName=$name"
        echo "SlurmctldHost=localhost(127.0.0.1)"
        echo "SlurmctldPort=$base"
        echo "SlurmdPort=$((base + 1))"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$dir/munge/munge.socket"
        echo "StateSaveLocation=$dir/state"
        echo "SlurmdSpoolDir=$dir/spool/%n"
        echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
        echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$dir/log/slurmctld.log"
        echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
        echo "SlurmctldDebug=info"
        echo "SlurmdDebug=info"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "JobRequeue=1"
        echo "KillWait=30"
        echo "MinJobAge=120"
        echo "FirstJobId=$((slot * 1000 + 1))"
        echo "InactiveLimit=0"
        echo "Waittime=0"
        echo "SlurmdTimeout=120"
        echo "SlurmctldTimeout=120"
        local i=0 n
        for n in "${NODES[@]}"; do
            i=$((i + 1))
            echo "NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((base + 1 + i)) CPUs=$CPUS_PER_NODE State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP"
    } >"$dir/etc/slurm.conf"
}

pick_slot() {  # pick_slot DIR -> a slot 0..15 whose 4 ports are free: the one DIR used last time, else by hash
    local dir=$1 h slot i p busy candidates=()
    [ -f "$dir/etc/slot" ] && candidates+=("$(cat "$dir/etc/slot")")
    h=$(printf '%s' "$dir" | cksum | cut -d' ' -f1)
    for i in $(seq 0 15); do candidates+=($(((h + i) % 16))); done
    for slot in "${candidates[@]}"; do
        busy=0
        for p in 0 1 2 3; do
            if port_busy $((61000 + slot * 8 + p)); then busy=1; fi
        done
        if [ "$busy" = 0 ]; then
            echo "$slot"
            return 0
        fi
    done
    die "no free port slot in 61000-61127"
}

cmd_start() {
    [ "$(id -u)" = 0 ] || die "start needs root (slurmd runs jobs as their submitting user)"
    have_slurm || die "slurm is not installed; run: $0 install"
    local dir
    dir=$(abs_dir "$1")
    export SLURM_CONF=$dir/etc/slurm.conf
    if cmd_status "$dir" 2>/dev/null; then
        cmd_env "$dir"
        return 0
    fi
    cmd_stop "$dir" >/dev/null 2>&1 || true   # half-started leftovers
    mkdir -p "$dir"/{etc,munge,state,log,run}
    chmod 755 "$dir/munge"   # clients reach the socket; the key itself is 0400
    local n
    for n in "${NODES[@]}"; do mkdir -p "$dir/spool/$n"; done
    local slot
    slot=$(pick_slot "$dir")
    echo "$slot" >"$dir/etc/slot"
    write_conf "$dir" "$slot"
    add_hosts

    # munge: a private key, socket and daemon for this cluster only.
    if [ ! -s "$dir/munge/munge.key" ]; then
        dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$dir/munge/munge.key"
    fi
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    wait_for 10 munged test -S "$dir/munge/munge.socket" || die "munged did not start; see $dir/log/munged.log"

    # State (the job id counter) is kept across stop/start, so run dirs keyed by job id are not reused;
    # -i: ignore errors in that state (e.g. after a crash) instead of refusing to start.
    slurmctld -i -f "$SLURM_CONF" || die "slurmctld did not start; see $dir/log/slurmctld.log"
    wait_for 20 slurmctld scontrol ping || die "slurmctld not answering; see $dir/log/slurmctld.log"
    for n in "${NODES[@]}"; do
        slurmd -N "$n" -f "$SLURM_CONF" || die "slurmd $n did not start; see $dir/log/slurmd-$n.log"
    done
    if ! wait_for 40 "nodes ${NODES[*]}" nodes_up; then
        sinfo -N >&2 || true
        die "nodes did not come up; see $dir/log/"
    fi
    cmd_env "$dir" | tee "$dir/env.sh"
}

stop_pidfiles() {  # stop_pidfiles FILE...: TERM them all, wait up to 10 s, then KILL what is left
    local f pid pids=() i
    for f in "$@"; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        if kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null; then pids+=("$pid"); fi
    done
    for i in $(seq 50); do
        local left=()
        for pid in ${pids[@]+"${pids[@]}"}; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
        pids=(${left[@]+"${left[@]}"})
        [ "${#pids[@]}" -eq 0 ] && break
        sleep 0.2
    done
    for pid in ${pids[@]+"${pids[@]}"}; do kill -9 "$pid" 2>/dev/null || true; done
    rm -f "$@"
}

cmd_stop() {
    local dir
    dir=$(abs_dir "$1")
    export SLURM_CONF=$dir/etc/slurm.conf
    if [ -f "$SLURM_CONF" ] && pid_alive "$dir/run/slurmctld.pid"; then
        # Kill every job's processes (SIGKILL: no KillWait) so no slurmstepd outlives its slurmd.
        scancel --full --signal=KILL --state=RUNNING --quiet 2>/dev/null || true
        scancel --quiet 2>/dev/null || true
        local i
        for i in $(seq 50); do
            [ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
    local n files=("$dir/run/slurmctld.pid")
    for n in "${NODES[@]}"; do files+=("$dir/run/slurmd-$n.pid"); done
    stop_pidfiles "${files[@]}"
    stop_pidfiles "$dir/run/munged.pid"
    rm -f "$dir/munge/munge.socket" "$dir/munge/munge.socket.lock"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    status) cmd_status "${2:-}" ;;
    env) cmd_env "${2:-}" ;;
    *)
        sed -n '2,9p' "$0" >&2
        exit 2
        ;;
esac
