#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian's slurmctld, slurmd, slurm-client and munge), for the
# tests and for trying the sbatch script without a cluster.
#
#   launch/slurm/local_cluster.sh install     install the packages (root; nothing to do when present)
#   launch/slurm/local_cluster.sh start DIR   write DIR/slurm.conf, start munged, slurmctld and slurmd, wait
#                                             for the node to be idle; prints `export SLURM_CONF=DIR/slurm.conf`
#   launch/slurm/local_cluster.sh stop DIR    stop the daemons started with DIR
#
# Commands such as sbatch and squeue find the cluster through SLURM_CONF. The node is this host, with all
# its cores and 90% of its available memory; one partition, `debug`, with no time limit.
set -euo pipefail

command=${1:-}
case "$command" in
install)
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
            && command -v munged >/dev/null; then
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    ;;
start)
    dir=$(realpath -m "${2:?usage: local_cluster.sh start DIR}")
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    if ! pgrep -x munged >/dev/null; then
        if [[ ! -s /etc/munge/munge.key ]]; then
            install -d -o munge -g munge -m 0700 /etc/munge
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
            chown munge:munge /etc/munge/munge.key
            chmod 0400 /etc/munge/munge.key
        fi
        install -d -o munge -g munge /run/munge /var/lib/munge /var/log/munge
        runuser -u munge -- /usr/sbin/munged
    fi
    host=$(hostname -s)
    cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc reports OMP_NUM_THREADS where it is set
    memory=$(( $(free -m | awk '/^Mem:/ {print $7}') * 9 / 10 ))
    cat > "$dir/slurm.conf" <<CONF
ClusterName=mbloom-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again once its old credential expired: 10 s here instead of 120.
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerParameters=batch_sched_delay=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cores RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -c -f "$SLURM_CONF"
    slurmd -c -f "$SLURM_CONF"
    for _ in $(seq 60); do
        if sinfo --noheader --format=%t 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 0.5
    done
    echo "local_cluster.sh: the node did not become idle in 30 s; see $dir/log" >&2
    exit 1
    ;;
stop)
    dir=$(realpath -m "${2:?usage: local_cluster.sh stop DIR}")
    # jobs still running (a test that failed half-way) end first: their ranks would outlive the daemons
    SLURM_CONF="$dir/slurm.conf" scancel --full --quiet 2>/dev/null || true
    for _ in 1 2 3 4 5; do
        [[ -z "$(SLURM_CONF="$dir/slurm.conf" squeue --noheader --states=RUNNING,COMPLETING 2>/dev/null)" ]] && break
        sleep 1
    done
    for daemon in slurmd slurmctld; do
        if [[ -s "$dir/$daemon.pid" ]]; then
            kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
        fi
    done
    ;;
*)
    echo "usage: local_cluster.sh install | start DIR | stop DIR" >&2
    exit 2
    ;;
esac
