#!/usr/bin/env bash
# A single-node Slurm on this machine, for the tests of the job scripts (tests/test_slurm.py) and for
# trying them by hand: installs Debian's slurm-wlm and munge if missing, writes /etc/slurm/slurm.conf
# naming this one node (its CPUs and memory as `slurmd -C` reports them), starts munged, slurmctld and
# slurmd as root, and returns once `sinfo` shows the node ready. Idempotent: run it again and it only
# starts what is not running. Needs root (it is meant for CI machines and containers).
#   bash scripts/slurm.sh          # install if needed, start, wait until the node is idle
#   bash scripts/slurm.sh stop     # stop the three daemons
#   bash scripts/slurm.sh munge    # install if needed and start munged only (scripts/cluster.sh)
# Exit codes: 0 ready; 3 the packages are missing and apt cannot fetch them (no registry reachable,
# or no apt at all); 1 anything else.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by eaglecache scripts/slurm.sh"
STATE=/var/lib/slurm/slurmctld
SPOOL=/var/lib/slurm/slurmd
LOGS=/var/log/slurm

die() { echo "slurm.sh: $*" >&2; exit "${2:-1}"; }

running() {  # running PIDFILE: the daemon whose pid the file holds is alive
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    command -v munged >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "slurm-wlm and munge are not installed, and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed, and there is no apt-get here" 3
  export DEBIAN_FRONTEND=noninteractive
  # an unreachable registry is the one reason a test may skip instead of failing
  apt-get update -qq --error-on=any || die "apt-get update failed: no package registry reachable" 3
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
    die "apt-get install slurm-wlm munge failed"
}

shared_settings() {  # the settings of both test Slurms (this one and scripts/cluster.sh's two-node one)
  cat <<'EOF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again cred_expire+1 s after its requeue (default 120 s)
AuthInfo=cred_expire=10
MailProg=/bin/true
# no cgroups in containers: track a job's processes through /proc (parent links), bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
# cores and memory are consumable: small jobs share the node (a job that names no memory gets 1 GiB per CPU,
# not the whole node)
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
# a node that was down (e.g. after a restart) comes back by itself once slurmd registers
ReturnToService=2
# finished jobs stay visible to scontrol for an hour (there is no accounting database)
MinJobAge=3600
KillWait=5
EOF
}

write_conf() {
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: this machine already has a Slurm setup; not touching it"
  fi
  local node
  # NodeName CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore RealMemory, as slurmd sees them
  # (a node declared larger than it is gets drained)
  node=$(slurmd -C | head -n1)
  local host=${node#NodeName=}; host=${host%% *}
  mkdir -p "$(dirname "$CONF")"
  cat > "$CONF.tmp" <<EOF
$MARK
ClusterName=eaglecache
SlurmctldHost=$host
$(shared_settings)
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmdTimeout=60
$node State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.tmp" "$CONF"; then rm -f "$CONF.tmp"; else mv "$CONF.tmp" "$CONF"; CHANGED=1; fi
}

start_munge() {
  [ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key && chown munge:munge /etc/munge/munge.key; }
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 0755 /run/munge
  running /run/munge/munged.pid || runuser -u munge -- munged
  for _ in $(seq 50); do munge -n </dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

start_slurm() {
  mkdir -p "$STATE" "$SPOOL" "$LOGS"
  if [ -n "${CHANGED:-}" ]; then  # a new slurm.conf: daemons started with the old one must re-read it
    running /run/slurmd.pid && kill "$(cat /run/slurmd.pid)"
    running /run/slurmctld.pid && kill "$(cat /run/slurmctld.pid)"
    for _ in $(seq 50); do running /run/slurmd.pid || running /run/slurmctld.pid || break; sleep 0.2; done
  fi
  running /run/slurmctld.pid || slurmctld
  running /run/slurmd.pid || slurmd
  local state=""
  for _ in $(seq 120); do
    state=$(sinfo -h -N -o %t 2>/dev/null | head -n1 || true)
    case "$state" in
      idle|mix|alloc|comp) echo "slurm.sh: node $(sinfo -h -N -o %N | head -n1) is $state"; return 0 ;;
      drain*|drng|down*) scontrol update nodename="$(sinfo -h -N -o %N | head -n1)" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  die "the node did not become idle (state '${state}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

stop_all() {
  for pidfile in /run/slurmd.pid /run/slurmctld.pid; do
    running "$pidfile" && kill "$(cat "$pidfile")"
  done
  running /run/munge/munged.pid && kill "$(cat /run/munge/munged.pid)"
  return 0
}

case "${1:-start}" in
  start) install_packages; write_conf; start_munge; start_slurm ;;
  munge) install_packages; start_munge ;;  # for scripts/cluster.sh's Slurm: the packages and munged only
  settings) shared_settings ;;  # for scripts/cluster.sh's slurm.conf
  stop) stop_all ;;
  *) die "usage: bash scripts/slurm.sh [start|munge|settings|stop]" 2 ;;
esac
