#!/usr/bin/env bash
# A one-node SLURM "cluster" on this machine, for tests/test_slurm.py and for trying scripts/slurm/train.sbatch.
#
#   scripts/slurm/local_cluster.sh install   # apt-get install slurm-wlm + munge, write slurm.conf, start daemons
#   scripts/slurm/local_cluster.sh start     # (re)start munged, slurmctld, slurmd with the existing config
#   scripts/slurm/local_cluster.sh status    # exit 0 and print the node state when the cluster accepts jobs
#   scripts/slurm/local_cluster.sh stop      # stop the daemons this script started (by their pid files)
#
# Debian/Ubuntu, run as root (CI: .ci/run calls `install` before the tests). No systemd needed: the daemons are
# started directly, so it also works in containers. Every step is idempotent; anything that cannot work here
# (not root, no apt, daemons that will not start) ends with a message on stderr and a non-zero exit, and
# tests/test_slurm.py then skips with the reason.
#
# The node: this host (short hostname), all its CPUs (`slurmd -C`), 90% of its memory, no cgroups
# (proctrack/linuxproc, task/none: containers often lack a writable cgroup tree), no accounting database.
set -uo pipefail

CONF_DIR=${SLURM_CONF_DIR:-/etc/slurm}
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
RUN=/run/slurm-local
MARK="# written by xorl_jax scripts/slurm/local_cluster.sh"

die() { echo "local_cluster: $*" >&2; exit 1; }
say() { echo "local_cluster: $*"; }

need_root() { [ "$(id -u)" = 0 ] || die "needs root (apt-get, daemons); run it with sudo or skip the SLURM test"; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    say "slurm-wlm and munge already installed ($(slurmd -V 2>/dev/null))"
    return 0
  fi
  command -v apt-get >/dev/null || die "no apt-get: install slurm-wlm and munge with this system's package manager"
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed (no network to the package registry?)"
  apt-get install -y -q slurm-wlm munge >/dev/null || die "apt-get install slurm-wlm munge failed"
}

write_conf() {
  local host cpus mem node
  host=$(hostname -s)
  node=$(slurmd -C 2>/dev/null | head -1)
  [ -n "$node" ] || die "slurmd -C printed nothing: cannot describe this node"
  cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(( ${mem:-2048} * 9 / 10 ))
  mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
  if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching it (remove it or use SLURM_CONF_DIR)"
  fi
  local new
  new=$(cat <<CONF
$MARK
ClusterName=xorl-local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=60
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
  if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then
    say "$CONF is up to date"
  else
    printf '%s\n' "$new" > "$CONF"
    say "wrote $CONF (node $host: $cpus CPUs, ${mem} MiB)"
  fi
}

alive() {  # alive PIDFILE: the process named in the pid file exists
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
  local pidfile=/run/munge/munged.pid
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  if alive "$pidfile" && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
    return 0
  fi
  if command -v runuser >/dev/null; then runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
  else munged --force || die "munged did not start (see /var/log/munge/munged.log)"; fi
  for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && { say "munged started"; return 0; }; sleep 0.5; done
  die "munged started but credentials do not verify (see /var/log/munge/munged.log)"
}

start_slurm() {
  if alive "$RUN/slurmctld.pid"; then say "slurmctld already running"
  else slurmctld || die "slurmctld did not start (see $LOGS/slurmctld.log)"; say "slurmctld started"; fi
  for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 1; done
  scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer (see $LOGS/slurmctld.log)"
  if alive "$RUN/slurmd.pid"; then say "slurmd already running"
  else slurmd || die "slurmd did not start (see $LOGS/slurmd.log)"; say "slurmd started"; fi
  local host state
  host=$(hostname -s)
  for _ in $(seq 30); do
    state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1)
    case "$state" in
      idle*|mixed*|alloc*|allocated*|completing*) say "node $host is $state"; return 0 ;;
      down*|drain*|drained*|fail*) scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  die "node $host did not become idle (state '${state:-?}'; reason: $(sinfo -h -n "$host" -o %E 2>/dev/null); see $LOGS/slurmd.log)"
}

status() {
  command -v sinfo >/dev/null || { echo "local_cluster: SLURM is not installed (run: $0 install)" >&2; return 1; }
  scontrol ping 2>/dev/null | grep -q UP || { echo "local_cluster: slurmctld is not answering (run: $0 start)" >&2; return 1; }
  local state
  state=$(sinfo -h -o '%n %T %c' 2>/dev/null | head -1)
  case "$state" in
    *" idle"*|*" mixed"*|*" alloc"*|*" completing"*) echo "local_cluster: up: $state"; return 0 ;;
  esac
  echo "local_cluster: slurmctld is up but no node accepts jobs: '${state:-no nodes}'" >&2
  return 1
}

stop() {
  local f
  for f in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" /run/munge/munged.pid; do
    if alive "$f"; then kill "$(cat "$f")" && say "stopped $(basename "$f" .pid)"; fi
  done
}

case "${1:-}" in
  install) need_root; install_packages; write_conf; start_munge; start_slurm; status ;;
  start) need_root; command -v slurmctld >/dev/null || die "SLURM is not installed (run: $0 install)"
         write_conf; start_munge; start_slurm; status ;;
  status) status ;;
  stop) need_root; stop ;;
  *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
