#!/usr/bin/env bash
# A two-node cluster on this machine, for the multi-node tests (tests/test_cluster.py): two network
# namespaces act as hosts n1 and n2 (each with its own address on a bridge and its own hostname), each runs
# an sshd (a key made for the cluster, root login with it only) and a slurmd of a two-node Slurm whose
# slurmctld runs on this machine, at the bridge's address, beside the single-node Slurm of scripts/slurm.sh.
# What a real cluster has, the two nodes have: names that resolve (/etc/hosts), passwordless ssh between
# every host (an ssh_config.d entry), a shared filesystem (this one), a Slurm with a partition of two nodes.
# Idempotent: `up` again starts only what is not running, so it also brings a node back after
# `kill-node`. Needs root, iproute2 and unshare; installs openssh-server, pdsh and (via slurm.sh) Slurm.
#   bash scripts/cluster.sh up          # create the hosts and start everything; prints SLURM_CONF=...
#   bash scripts/cluster.sh kill-node n2  # SIGKILL every process of host n2 (a node lost mid-run)
#   bash scripts/cluster.sh down        # stop the daemons, remove the hosts and every file `up` wrote
# Exit codes: 0 ready; 3 no namespaces here (not root, no iproute2) or packages missing that apt cannot
# fetch; 1 anything else.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
NET="${EAGLECACHE_CLUSTER_NET:-10.77.0}"  # a /24 of the bridge: .1 this machine, .11 n1, .12 n2
STATE=/var/lib/eaglecache-cluster
CONF="$STATE/slurm.conf"
BRIDGE=ecbr0
NODES=(n1 n2)
MARK="# eaglecache-cluster"
SSH_CLIENT_CONF=/etc/ssh/ssh_config.d/eaglecache-cluster.conf
CTLD_PORT=6827  # not Slurm's defaults: scripts/slurm.sh's single-node Slurm keeps 6817/6818
SLURMD_PORT=6828

die() { echo "cluster.sh: $*" >&2; exit "${2:-1}"; }
address() { echo "$NET.1${1#n}"; }  # n1 -> NET.11
netns() { echo "ec-$1"; }

alive() {  # alive NODE COMM: a process named COMM runs in NODE's namespace
  local pid
  for pid in $(ip netns pids "$(netns "$1")" 2>/dev/null); do
    # a killed daemon stays listed until it is reaped: a zombie is not alive
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" &&
      return 0
  done
  return 1
}

on_node() {  # on_node NODE CMD...: run CMD as host NODE would (its network, its hostname)
  local node=$1; shift
  # nsenter, not `ip netns exec`: that one mounts a fresh /sys, without the cgroup tree slurmd reads
  nsenter --net="/run/netns/$(netns "$node")" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}

preflight() {
  [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces)" 3
  command -v ip >/dev/null && command -v unshare >/dev/null && command -v nsenter >/dev/null ||
    die "needs iproute2, unshare and nsenter" 3
  ip netns list >/dev/null 2>&1 || die "network namespaces are not available here" 3
  if ! command -v sshd >/dev/null || ! command -v pdsh >/dev/null; then
    command -v apt-get >/dev/null || die "openssh-server and pdsh are missing and there is no apt-get" 3
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq --error-on=any || die "apt-get update failed: no package registry reachable" 3
    apt-get install -y -qq --no-install-recommends openssh-server openssh-client pdsh >/dev/null ||
      die "apt-get install openssh-server pdsh failed"
  fi
  local rc=0
  bash "$HERE/slurm.sh" munge || rc=$?  # Slurm's packages and the munge daemon both Slurms share
  [ "$rc" -eq 0 ] || exit "$rc"
}

make_hosts() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  local node ns
  for node in "${NODES[@]}"; do
    ns=$(netns "$node")
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
      ip link add "$ns-h" type veth peer name eth0 netns "$ns"
      ip link set "$ns-h" master "$BRIDGE" up
      ip -n "$ns" addr add "$(address "$node")/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    fi
  done
  # names every host resolves (the namespaces share this machine's files)
  local line
  for line in "$NET.1 ec-head" "$(address n1) n1" "$(address n2) n2"; do
    if ! grep -qF "$line $MARK" /etc/hosts; then
      if awk -v name="${line#* }" '$2 == name' /etc/hosts | grep -q .; then
        die "/etc/hosts already names a host ${line#* } (not written by this script): not touching it"
      fi
      echo "$line $MARK" >> /etc/hosts
    fi
  done
}

start_sshd() {
  mkdir -p "$STATE/ssh" /run/sshd
  chmod 700 "$STATE/ssh"
  [ -f "$STATE/ssh/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -C eaglecache-cluster -f "$STATE/ssh/id_ed25519"
  [ -f "$STATE/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$STATE/ssh/host_ed25519"
  cp "$STATE/ssh/id_ed25519.pub" "$STATE/ssh/authorized_keys"
  cat > "$SSH_CLIENT_CONF" <<EOF
$MARK: how this machine and the hosts of scripts/cluster.sh reach each other (\`cluster.sh down\` removes it)
Host n1 n2 ec-head
  IdentityFile $STATE/ssh/id_ed25519
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
EOF
  local node
  for node in "${NODES[@]}"; do
    cat > "$STATE/ssh/sshd_$node.conf" <<EOF
ListenAddress $(address "$node")
HostKey $STATE/ssh/host_ed25519
AuthorizedKeysFile $STATE/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $STATE/ssh/sshd_$node.pid
# the session keeps the client's environment variables DeepSpeed's runner does not export itself
AcceptEnv LANG LC_*
EOF
    alive "$node" sshd || on_node "$node" /usr/sbin/sshd -f "$STATE/ssh/sshd_$node.conf"
  done
}

write_slurm_conf() {
  local hw
  # CPUs, boards, sockets, cores, memory as slurmd sees them (a node declared larger gets drained)
  hw=$(slurmd -C | head -n1); hw=${hw#NodeName=* }
  mkdir -p "$STATE/slurmctld" "$STATE/log"
  cat > "$CONF.tmp" <<EOF
$MARK: the two-node Slurm of scripts/cluster.sh; use it with SLURM_CONF=$CONF
ClusterName=eaglecache-pair
SlurmctldHost=ec-head($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
$(bash "$HERE/slurm.sh" settings)
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/%n/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/%n/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# a node whose slurmd is gone is declared down after this long (the node-loss test waits for it)
SlurmdTimeout=10
NodeName=n1 NodeAddr=$(address n1) $hw State=UNKNOWN
NodeName=n2 NodeAddr=$(address n2) $hw State=UNKNOWN
PartitionName=pair Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.tmp" "$CONF"; then rm -f "$CONF.tmp"; else mv "$CONF.tmp" "$CONF"; CHANGED=1; fi
}

start_slurm() {
  local node
  if [ -n "${CHANGED:-}" ]; then  # daemons started with another slurm.conf must re-read it
    stop_slurm
  fi
  # slurmctld serves only where its hostname is SlurmctldHost's name: ec-head, this machine on the bridge
  [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null ||
    unshare --uts sh -c 'hostname ec-head && exec slurmctld -f "$0"' "$CONF"
  for node in "${NODES[@]}"; do
    mkdir -p "$STATE/$node/spool"
    alive "$node" slurmd || on_node "$node" slurmd -f "$CONF" -N "$node"
  done
  local states=""
  for _ in $(seq 120); do
    states=$(SLURM_CONF=$CONF sinfo -h -N -o "%N=%t" 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ "$states" =~ ^n1=(idle|mix|alloc|comp)\ n2=(idle|mix|alloc|comp)\ $ ]]; then
      echo "cluster.sh: nodes ready: $states"; echo "SLURM_CONF=$CONF"; return 0
    fi
    for node in "${NODES[@]}"; do
      if [[ "$states" =~ $node=(drain|drng|down) ]]; then
        SLURM_CONF=$CONF scontrol update nodename="$node" state=resume 2>/dev/null || true
      fi
    done
    sleep 0.5
  done
  die "the nodes did not become idle ($states); see $STATE/log/"
}

kill_node() {  # every process of the host: its daemons and whatever runs there
  local node=$1 pid
  [[ " ${NODES[*]} " == *" $node "* ]] || die "no node $node (the nodes are ${NODES[*]})" 2
  for _ in $(seq 50); do  # a dying process may have forked: sweep until the namespace is empty
    local pids
    pids=$(ip netns pids "$(netns "$node")" 2>/dev/null || true)
    [ -n "$pids" ] || return 0
    for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
    sleep 0.2
  done
}

stop_slurm() {
  local node
  for node in "${NODES[@]}"; do
    for pid in $(ip netns pids "$(netns "$node")" 2>/dev/null); do
      [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmd ] && kill "$pid" 2>/dev/null || true
    done
  done
  [ -s "$STATE/slurmctld.pid" ] && kill "$(cat "$STATE/slurmctld.pid")" 2>/dev/null || true
  for _ in $(seq 50); do
    pgrep -f "slurm(ctld|d) -f $CONF" >/dev/null || return 0
    sleep 0.2
  done
}

down() {
  local node
  for node in "${NODES[@]}"; do kill_node "$node"; done
  stop_slurm
  for node in "${NODES[@]}"; do
    ip netns del "$(netns "$node")" 2>/dev/null || true
    ip link del "$(netns "$node")-h" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if grep -qF "$MARK" /etc/hosts; then
    # rewritten in place: /etc/hosts may be a bind mount that a rename would not replace
    grep -vF "$MARK" /etc/hosts > /etc/hosts.eaglecache-tmp || true
    cat /etc/hosts.eaglecache-tmp > /etc/hosts && rm -f /etc/hosts.eaglecache-tmp
  fi
  rm -f "$SSH_CLIENT_CONF"
  rm -rf "$STATE"
}

case "${1:-up}" in
  up) preflight; make_hosts; start_sshd; write_slurm_conf; start_slurm ;;
  kill-node) [ $# -eq 2 ] || die "usage: bash scripts/cluster.sh kill-node NODE" 2; kill_node "$2" ;;
  down) down ;;
  *) die "usage: bash scripts/cluster.sh [up|kill-node NODE|down]" 2 ;;
esac
