#!/usr/bin/env bash
# SLURM 22.05 test cluster for lintrans on one machine (Debian 12, run as
# root, no systemd, no cgroups): one node `localhost`, or nodes n1..nN each
# with its own slurmd in a private UTS + mount namespace. Every file (munge
# key and socket, MariaDB data, configs, state, logs, pid files) lives
# under one directory.
#
#   slurm/cluster.sh start [--nodes N] [DIR]  start (or finish starting) the
#                                   cluster; N defaults to the count DIR was
#                                   last started with, else 1 (`localhost`)
#   slurm/cluster.sh stop   [DIR]   cancel jobs, stop every daemon (idempotent)
#   slurm/cluster.sh status [DIR]   show daemons and each node's state
#   slurm/cluster.sh env    [DIR]   print exports for clients:
#                                   eval "$(slurm/cluster.sh env)"
#   slurm/cluster.sh node-kill  NODE [DIR]  crash NODE: SIGKILL its slurmd,
#                                   slurmstepds and job tasks
#   slurm/cluster.sh node-start NODE [DIR]  start NODE's slurmd again
#
# DIR defaults to ${LINTRANS_SLURM_DIR:-/tmp/lintrans-slurm}.
# Packages: slurm/install_system_packages.sh.  Details: slurm/README.md.
set -euo pipefail

usage() {
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2
  exit "${1:-2}"
}

[[ $# -ge 1 ]] || usage
CMD="$1"
shift
NODES_ARG=""
POSITIONAL=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes)
      [[ $# -ge 2 ]] || usage
      NODES_ARG="$2"
      shift 2
      ;;
    --nodes=*)
      NODES_ARG="${1#--nodes=}"
      shift
      ;;
    -h | --help) usage 0 ;;
    -*) usage ;;
    *)
      POSITIONAL+=("$1")
      shift
      ;;
  esac
done
TARGET_NODE=""
case "$CMD" in
  node-kill | node-start)
    [[ ${#POSITIONAL[@]} -ge 1 && ${#POSITIONAL[@]} -le 2 ]] || usage
    TARGET_NODE="${POSITIONAL[0]}"
    POSITIONAL=("${POSITIONAL[@]:1}")
    ;;
  *) [[ ${#POSITIONAL[@]} -le 1 ]] || usage ;;
esac
[[ -z "$NODES_ARG" || "$CMD" == start ]] || usage
if [[ -n "$NODES_ARG" ]] && ! [[ "$NODES_ARG" =~ ^[0-9]+$ && "$NODES_ARG" -ge 1 && "$NODES_ARG" -le 254 ]]; then
  printf 'cluster.sh: error: --nodes wants a number from 1 to 254, not %s\n' "$NODES_ARG" >&2
  exit 2
fi
DIR="${POSITIONAL[0]:-${LINTRANS_SLURM_DIR:-/tmp/lintrans-slurm}}"
# Absolute path without requiring it to exist yet.
case "$DIR" in
  /*) ;;
  *) DIR="$PWD/$DIR" ;;
esac
DIR="${DIR%/}"

# ---------------------------------------------------------------- settings
CLUSTER_NAME="${LINTRANS_SLURM_CLUSTER_NAME:-lintrans}"
ACCOUNT_NAME="${LINTRANS_SLURM_ACCOUNT:-lintrans}"
SLURMCTLD_PORT="${LINTRANS_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${LINTRANS_SLURMD_PORT:-16818}"
SLURMDBD_PORT="${LINTRANS_SLURMDBD_PORT:-16819}"
MYSQL_PORT="${LINTRANS_SLURM_MYSQL_PORT:-13306}"
MAX_ARRAY_SIZE="${LINTRANS_SLURM_MAX_ARRAY_SIZE:-1001}"
NODE_CPUS="${LINTRANS_SLURM_CPUS:-$(nproc)}"
START_TIMEOUT="${LINTRANS_SLURM_START_TIMEOUT:-60}"
# Fake `gpu` GRES per node (no real device behind it, see write_configs):
# jobs asking for --gres=gpu:1 / --gpus-per-node=1 are scheduled and run
# (and find no CUDA).
NODE_GPUS="${LINTRANS_SLURM_GPUS:-2}"
[[ "$NODE_GPUS" =~ ^[0-9]+$ ]] || {
  printf 'cluster.sh: error: LINTRANS_SLURM_GPUS must be a count, not %s\n' "$NODE_GPUS" >&2
  exit 2
}

# ------------------------------------------------------------------ layout
ETC="$DIR/etc"
LOG="$DIR/log"
RUN="$DIR/run"
MUNGE_DIR="$DIR/munge"
MUNGE_KEY="$MUNGE_DIR/munge.key"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
MUNGE_PID="$MUNGE_DIR/munged.pid"
MUNGE_LOG="$MUNGE_DIR/munged.log"
MUNGE_SEED="$MUNGE_DIR/munged.seed"
DB_DIR="$DIR/mysql"
DB_SOCKET="$RUN/mysqld.sock"
DB_PID="$RUN/mysqld.pid"
DB_LOG="$LOG/mysqld.log"
DB_PASS_FILE="$ETC/mysql.pass"
DB_NAME="slurm_acct_db"
DB_USER="slurm"
SLURM_CONF_FILE="$ETC/slurm.conf"
SLURMDBD_CONF_FILE="$ETC/slurmdbd.conf"
STATE_DIR="$DIR/state"
SPOOL_DIR="$DIR/spool"
TMP_DIR="$DIR/tmp"
SLURMCTLD_PID="$RUN/slurmctld.pid"
SLURMDBD_PID="$RUN/slurmdbd.pid"
SLURMCTLD_LOG="$LOG/slurmctld.log"
SLURMDBD_LOG="$LOG/slurmdbd.log"
GRES_CONF_FILE="$ETC/gres.conf"
DEV_DIR="$DIR/dev"
HOSTS_FILE="$ETC/hosts"
NODES_FILE="$ETC/nodes"
# slurmctld and slurmdbd are reached as localhost (127.0.0.1).
CTLD_HOST="localhost"
HOSTS_TAG="# lintrans-slurm-node"

# Every daemon (and slurmstepd, which inherits slurmd's environment) carries
# this variable, so `stop` can find stragglers of *this* cluster only.
MARKER="LINTRANS_SLURM_DAEMON_DIR=$DIR"

# Client commands of this script use the private config.
export SLURM_CONF="$SLURM_CONF_FILE"

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# -------------------------------------------------------------------- nodes
# One node (the default) is `localhost`, exactly as before multi-node
# support. N >= 2 nodes are n1..nN, node i at 127.0.0.i, each slurmd in its
# own UTS + mount namespace. The count is kept in DIR/etc/nodes.
stored_nodes() {
  local n
  [[ -r "$NODES_FILE" ]] || return 1
  n="$(tr -dc '0-9' <"$NODES_FILE")"
  [[ -n "$n" && "$n" -ge 1 ]] || return 1
  printf '%s\n' "$n"
}

# set_nodes N: NODE_COUNT, MULTI (0/1), NODE_NAMES, NODE_PORTS and the
# memory each node advertises.
set_nodes() {
  local i port
  NODE_COUNT="$1"
  NODE_NAMES=()
  NODE_PORTS=()
  if [[ "$NODE_COUNT" -eq 1 ]]; then
    MULTI=0
    NODE_NAMES=(localhost)
    NODE_PORTS=("$SLURMD_PORT")
  else
    MULTI=1
    # Every slurmd listens on 0.0.0.0:<its port>, so ports must differ:
    # LINTRANS_SLURMD_PORT + i - 1, skipping the other daemons' ports.
    port="$SLURMD_PORT"
    for ((i = 1; i <= NODE_COUNT; i++)); do
      while [[ "$port" == "$SLURMCTLD_PORT" || "$port" == "$SLURMDBD_PORT" || "$port" == "$MYSQL_PORT" ]]; do
        port=$((port + 1))
      done
      NODE_NAMES+=("n$i")
      NODE_PORTS+=("$port")
      port=$((port + 1))
    done
  fi
  if [[ -n "${LINTRANS_SLURM_REAL_MEMORY:-}" ]]; then
    REAL_MEMORY="$LINTRANS_SLURM_REAL_MEMORY"
  else
    # 95% of MemTotal in MiB, shared among the nodes: slurmd drains a node
    # whose RealMemory exceeds what it measures.
    REAL_MEMORY="$(awk -v n="$NODE_COUNT" '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.95 / n }' /proc/meminfo)"
  fi
  DEF_MEM_PER_CPU="$((REAL_MEMORY / NODE_CPUS))"
}

set_nodes "$(stored_nodes || echo 1)"

node_index() {
  local i
  for i in "${!NODE_NAMES[@]}"; do
    if [[ "${NODE_NAMES[$i]}" == "$1" ]]; then
      printf '%s\n' "$i"
      return 0
    fi
  done
  return 1
}

slurmd_pidfile() {
  if [[ $MULTI -eq 1 ]]; then printf '%s\n' "$RUN/slurmd.$1.pid"; else printf '%s\n' "$RUN/slurmd.pid"; fi
}

slurmd_logfile() {
  if [[ $MULTI -eq 1 ]]; then printf '%s\n' "$LOG/slurmd.$1.log"; else printf '%s\n' "$LOG/slurmd.log"; fi
}

# "slurmd" for the single node, "slurmd nI" otherwise (messages, status).
slurmd_label() {
  if [[ $MULTI -eq 1 ]]; then printf 'slurmd %s\n' "$1"; else printf 'slurmd\n'; fi
}

# Namespaces (uts and mnt) of a multi-node node's slurmd, kept so that
# node-kill and stop find its steps and tasks even after slurmd is gone.
node_ns_file() { printf '%s\n' "$RUN/node.$1.ns"; }

# ------------------------------------------------------------ process utils
# pid_of PIDFILE -> prints the pid if that process is alive and belongs to
# this cluster (guards against pid reuse), else returns 1.
pid_of() {
  local pidfile="$1" pid
  [[ -r "$pidfile" ]] || return 1
  pid="$(tr -dc '0-9' <"$pidfile" 2>/dev/null || true)"
  [[ -n "$pid" ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  grep -qzxF -- "$MARKER" "/proc/$pid/environ" 2>/dev/null || return 1
  printf '%s\n' "$pid"
}

is_running() { pid_of "$1" >/dev/null; }

# tree_of MATCH: every live process for which `MATCH PID` succeeds, plus all
# of their descendants (one pass over /proc, then closed under "child of").
tree_of() {
  local match="$1" p pid stat rest ppid changed
  local -A parent=() keep=()
  for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    [[ "$pid" == "$$" || "$pid" == "${BASHPID:-}" ]] && continue
    stat="$(cat "$p/stat" 2>/dev/null)" || continue
    rest="${stat##*) }"
    read -r _ ppid _ <<<"$rest"
    parent["$pid"]="$ppid"
    if "$match" "$pid"; then keep["$pid"]=1; fi
  done
  [[ ${#keep[@]} -gt 0 ]] || return 0
  changed=1
  while [[ $changed -eq 1 ]]; do
    changed=0
    for pid in "${!parent[@]}"; do
      if [[ -z "${keep[$pid]:-}" && -n "${keep[${parent[$pid]}]:-}" ]]; then
        keep["$pid"]=1
        changed=1
      fi
    done
  done
  for pid in "${!keep[@]}"; do printf '%s\n' "$pid"; done
}

# has_marker PID: the process carries this cluster's marker.
has_marker() { grep -qzxF -- "$MARKER" "/proc/$1/environ" 2>/dev/null; }

# is_stepd PID: one of this cluster's slurmstepds.
is_stepd() {
  local comm
  comm="$(cat "/proc/$1/comm" 2>/dev/null)" || return 1
  [[ "$comm" == slurmstepd* ]] && has_marker "$1"
}

# All live processes that carry this cluster's marker, plus their
# descendants (job steps started by slurmstepd).
cluster_pids() { tree_of has_marker; }

# ns_of PID: "uts:[...] mnt:[...]" of a process.
ns_of() {
  local uts mnt
  uts="$(readlink "/proc/$1/ns/uts" 2>/dev/null)" || return 1
  mnt="$(readlink "/proc/$1/ns/mnt" 2>/dev/null)" || return 1
  printf '%s %s\n' "$uts" "$mnt"
}

# node_pids NODE: the processes of a node, as if it were a machine: its
# slurmd, slurmstepds and job tasks. For n1..nN, everything in the node's
# UTS + mount namespaces; for the single node `localhost`, slurmd plus this
# cluster's slurmstepds and their descendants.
node_pids() {
  local node="$1" pid ns
  if [[ $MULTI -eq 1 ]]; then
    if pid="$(pid_of "$(slurmd_pidfile "$node")")"; then
      ns="$(ns_of "$pid")" || ns=""
    else
      ns="$(cat "$(node_ns_file "$node")" 2>/dev/null)" || ns=""
    fi
    [[ -n "$ns" ]] || return 0
    # The root namespaces are everyone's: never match them.
    [[ "$ns" != "$(ns_of 1 || true)" ]] || return 0
    # One find for all processes (a readlink per process is slow).
    { find /proc/[0-9]*/ns/uts /proc/[0-9]*/ns/mnt -maxdepth 0 -printf '%p %l\n' 2>/dev/null || true; } |
      awk -v want="$ns" -v self="$$" -v self2="${BASHPID:-}" '
        { split($1, a, "/"); if (a[5] == "uts") u[a[3]] = $2; else m[a[3]] = $2 }
        END { for (p in u) if ((p in m) && u[p] " " m[p] == want && p != self && p != self2) print p }'
    return 0
  fi
  pid_of "$(slurmd_pidfile "$node")" || true
  tree_of is_stepd
}

# kill_node NODE: SIGKILL every process of NODE (repeat until none is left:
# a dying slurmd may still have forked). Prints how many were killed.
kill_node() {
  local node="$1" pids pid i
  local -A seen=()
  for ((i = 0; i < 50; i++)); do
    pids="$(node_pids "$node" | tr '\n' ' ')"
    [[ -n "${pids// /}" ]] || break
    for pid in $pids; do seen["$pid"]=1; done
    # shellcheck disable=SC2086 # one pid per word
    kill -KILL $pids 2>/dev/null || true
    sleep 0.1
  done
  pids="$(node_pids "$node" | tr '\n' ' ')"
  [[ -z "${pids// /}" ]] || log "warning: processes of node $node survived SIGKILL: $pids"
  rm -f "$(slurmd_pidfile "$node")"
  [[ -n "${pids// /}" ]] || rm -f "$(node_ns_file "$node")"
  printf '%s\n' "${#seen[@]}"
}

# stop_pidfile NAME PIDFILE [TIMEOUT]: SIGTERM, wait, then SIGKILL.
stop_pidfile() {
  local name="$1" pidfile="$2" timeout="${3:-15}" pid i
  if pid="$(pid_of "$pidfile")"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name (pid $pid) did not stop after ${timeout}s, killing it"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pidfile"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s.
wait_for() {
  local timeout="$1" what="$2" i
  shift 2
  for ((i = 0; i < timeout * 5; i++)); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  log "timed out after ${timeout}s waiting for $what"
  return 1
}

show_log() {
  local f="$1"
  if [[ -f "$f" ]]; then
    log "last lines of $f:"
    tail -n 20 "$f" >&2 || true
  fi
}

# port_in_use PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# require_free_port PORT WHAT VARIABLE
require_free_port() {
  if port_in_use "$1"; then
    die "port $1 for $2 is already in use (another cluster?); choose another with $3=PORT"
  fi
}

# run_daemon LOGFILE COMMAND...: start a daemon detached from our stdio with
# the cluster marker in its environment.
run_daemon() {
  local logfile="$1"
  shift
  env "$MARKER" SLURM_CONF="$SLURM_CONF_FILE" setsid "$@" </dev/null >>"$logfile" 2>&1
}

# ------------------------------------------------------------------- munge
setup_munge() {
  mkdir -p "$MUNGE_DIR"
  chmod 0711 "$MUNGE_DIR"
  if [[ ! -s "$MUNGE_KEY" ]]; then
    rm -f "$MUNGE_KEY"
    (umask 0277 && dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
  fi
  chmod 0400 "$MUNGE_KEY"
}

munge_works() {
  munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"
}

start_munge() {
  is_running "$MUNGE_PID" && return 0
  setup_munge
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MUNGE_PID"
  run_daemon "$LOG/munged.stdout" munged \
    --socket="$MUNGE_SOCKET" \
    --key-file="$MUNGE_KEY" \
    --pid-file="$MUNGE_PID" \
    --log-file="$MUNGE_LOG" \
    --seed-file="$MUNGE_SEED" \
    --num-threads=2 ||
    {
      show_log "$MUNGE_LOG"
      die "munged failed to start"
    }
  wait_for 10 "munged" munge_works || {
    show_log "$MUNGE_LOG"
    die "munged is not answering on $MUNGE_SOCKET"
  }
  log "munged running (pid $(pid_of "$MUNGE_PID" || echo '?'))"
}

# ----------------------------------------------------------------- mariadb
db_client() {
  mariadb --no-defaults --protocol=socket --socket="$DB_SOCKET" -uroot "$@"
}

db_works() { db_client -e 'SELECT 1'; }

start_mariadb() {
  is_running "$DB_PID" && return 0
  mkdir -p "$DB_DIR"
  if [[ ! -d "$DB_DIR/mysql" ]]; then
    log "initialising MariaDB data directory $DB_DIR"
    mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" \
      --auth-root-authentication-method=socket --skip-test-db \
      --skip-name-resolve >"$LOG/mariadb-install-db.log" 2>&1 ||
      {
        show_log "$LOG/mariadb-install-db.log"
        die "mariadb-install-db failed"
      }
  fi
  rm -f "$DB_SOCKET" "$DB_SOCKET.lock" "$DB_PID"
  # mariadbd does not daemonise itself: background it, detached.
  env "$MARKER" setsid mariadbd --no-defaults \
    --user=root \
    --datadir="$DB_DIR" \
    --tmpdir="$TMP_DIR" \
    --socket="$DB_SOCKET" \
    --pid-file="$DB_PID" \
    --log-error="$DB_LOG" \
    --bind-address=127.0.0.1 \
    --port="$MYSQL_PORT" \
    --skip-name-resolve \
    --skip-log-bin \
    --innodb-buffer-pool-size=512M \
    --innodb-log-file-size=64M \
    --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=2 \
    --max-connections=64 \
    </dev/null >>"$LOG/mysqld.stdout" 2>&1 &
  disown || true
  wait_for "$START_TIMEOUT" "MariaDB" db_works || {
    show_log "$DB_LOG"
    die "MariaDB did not come up (port $MYSQL_PORT)"
  }
  local pass
  pass="$(cat "$DB_PASS_FILE")"
  db_client <<SQL || die "could not create the MariaDB user for slurmdbd"
CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$pass';
GRANT ALL ON \`$DB_NAME\`.* TO '$DB_USER'@'127.0.0.1';
GRANT ALL ON \`${DB_NAME}_job_comp\`.* TO '$DB_USER'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
  log "MariaDB running on 127.0.0.1:$MYSQL_PORT (pid $(pid_of "$DB_PID" || echo '?'))"
}

# ------------------------------------------------------------------ configs
write_configs() {
  mkdir -p "$ETC" "$LOG" "$RUN" "$STATE_DIR" "$SPOOL_DIR" "$TMP_DIR"
  chmod 0755 "$DIR" "$ETC" "$LOG" "$RUN" "$STATE_DIR" "$SPOOL_DIR"
  chmod 1777 "$TMP_DIR"
  local node i
  if [[ $MULTI -eq 1 ]]; then
    # slurmd does not create its %n spool folder; one TmpFS per node (a
    # shared one breaks srun --mpi=pmix: "pmixp_mkdir ... File exists").
    for node in "${NODE_NAMES[@]}"; do
      mkdir -p "$SPOOL_DIR/$node" "$TMP_DIR/$node"
      chmod 0755 "$SPOOL_DIR/$node"
      chmod 1777 "$TMP_DIR/$node"
    done
  fi
  if [[ ! -s "$DB_PASS_FILE" ]]; then
    (umask 0077 && head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24 >"$DB_PASS_FILE")
  fi
  chmod 0600 "$DB_PASS_FILE"

  local tmp kind spool slurmd_pid slurmd_log tmpfs timeouts nodes_lines gres_types
  local gres_line="" partition_nodes
  if [[ $MULTI -eq 1 ]]; then
    kind="$NODE_COUNT-node"
    spool="$SPOOL_DIR/%n"
    slurmd_pid="$RUN/slurmd.%n.pid"
    slurmd_log="$LOG/slurmd.%n.log"
    tmpfs="$TMP_DIR/%n"
    # A dead node is NOT_RESPONDING after ~7-10 s and DOWN (its jobs
    # requeued, or NODE_FAIL) after ~15 s.
    timeouts="SlurmdTimeout=5
MessageTimeout=5"
  else
    kind="single-node"
    spool="$SPOOL_DIR"
    slurmd_pid="$RUN/slurmd.pid"
    slurmd_log="$LOG/slurmd.log"
    tmpfs="$TMP_DIR"
    timeouts="SlurmdTimeout=60"
  fi
  if [[ "$NODE_GPUS" -gt 0 ]]; then
    # AccountingStorageTRES: sacct's AllocTRES shows gres/gpu=<n>.
    gres_types="GresTypes=gpu
AccountingStorageTRES=gres/gpu"
    gres_line=" Gres=gpu:$NODE_GPUS"
  else
    gres_types="# no GRES (LINTRANS_SLURM_GPUS=0)"
  fi
  nodes_lines=""
  for i in "${!NODE_NAMES[@]}"; do
    node="${NODE_NAMES[$i]}"
    if [[ $MULTI -eq 1 ]]; then
      nodes_lines+="NodeName=$node NodeHostname=$node NodeAddr=127.0.0.$((i + 1)) Port=${NODE_PORTS[$i]}"
    else
      nodes_lines+="NodeName=$node NodeHostname=$node NodeAddr=127.0.0.1"
    fi
    nodes_lines+=" CPUs=$NODE_CPUS RealMemory=$REAL_MEMORY$gres_line State=UNKNOWN"$'\n'
  done
  partition_nodes="$(
    IFS=,
    printf '%s' "${NODE_NAMES[*]}"
  )"

  tmp="$(mktemp "$ETC/.slurm.conf.XXXXXX")"
  cat >"$tmp" <<EOF
# Generated by slurm/cluster.sh -- $kind lintrans test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$CTLD_HOST(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root

# Private munge daemon (see AuthInfo); cred_expire=5 lets a requeued job
# start again after ~5 s instead of the default 120 s.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=5

StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$spool
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$SLURMCTLD_LOG
SlurmdLogFile=$slurmd_log
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$tmpfs
MailProg=/bin/true

# No systemd / cgroups on the test machines.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none

SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM_PER_CPU
ReturnToService=2
JobRequeue=1
MaxArraySize=$MAX_ARRAY_SIZE
MaxJobCount=100000
KillWait=5
InactiveLimit=0
MinJobAge=300
Waittime=0
SlurmctldTimeout=30
$timeouts
SlurmdParameters=config_overrides
$gres_types

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_HOST
AccountingStoragePort=$SLURMDBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none

${nodes_lines}PartitionName=debug Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 0644 "$tmp"
  mv -f "$tmp" "$SLURM_CONF_FILE"

  # Fake `gpu` GRES, no autodetection (no NVML here). Slurm 22.05 drops a
  # gpu record without File= ("Discarding the following config-only GPU due
  # to lack of File specification") and then drains the node, and a File
  # must be a character or block device: each fake GPU is a symlink
  # DIR/dev/gpu<k> -> /dev/null.
  if [[ "$NODE_GPUS" -gt 0 ]]; then
    mkdir -p "$DEV_DIR"
    chmod 0755 "$DEV_DIR"
    for ((i = 0; i < NODE_GPUS; i++)); do
      ln -sfn /dev/null "$DEV_DIR/gpu$i"
    done
  fi
  tmp="$(mktemp "$ETC/.gres.conf.XXXXXX")"
  {
    printf '# Generated by slurm/cluster.sh -- fake gpu GRES (File= links to /dev/null).\n'
    printf 'AutoDetect=off\n'
    if [[ "$NODE_GPUS" -gt 0 ]]; then
      for node in "${NODE_NAMES[@]}"; do
        printf 'NodeName=%s Name=gpu Count=%s File=%s\n' "$node" "$NODE_GPUS" "$DEV_DIR/gpu[0-$((NODE_GPUS - 1))]"
      done
    fi
  } >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$GRES_CONF_FILE"

  # Private hosts file, bind-mounted on /etc/hosts in each node's mount
  # namespace: n1..nN resolve inside jobs (MASTER_ADDR for torch c10d).
  if [[ $MULTI -eq 1 ]]; then
    tmp="$(mktemp "$ETC/.hosts.XXXXXX")"
    {
      grep -vF -- "$HOSTS_TAG" /etc/hosts || true
      for i in "${!NODE_NAMES[@]}"; do
        printf '127.0.0.%d\t%s\t%s\n' "$((i + 1))" "${NODE_NAMES[$i]}" "$HOSTS_TAG"
      done
    } >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$HOSTS_FILE"
  fi

  tmp="$(mktemp "$ETC/.nodes.XXXXXX")"
  printf '%s\n' "$NODE_COUNT" >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$NODES_FILE"

  tmp="$(mktemp "$ETC/.slurmdbd.conf.XXXXXX")"
  cat >"$tmp" <<EOF
# Generated by slurm/cluster.sh -- lintrans test cluster.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$CTLD_HOST
DbdAddr=127.0.0.1
DbdPort=$SLURMDBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$SLURMDBD_LOG
PidFile=$SLURMDBD_PID
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=$DB_USER
StoragePass=$(cat "$DB_PASS_FILE")
StorageLoc=$DB_NAME
EOF
  chmod 0600 "$tmp"
  mv -f "$tmp" "$SLURMDBD_CONF_FILE"
}

# ------------------------------------------------------------------- slurm
dbd_works() { sacctmgr -n -P show cluster format=cluster; }

start_slurmdbd() {
  is_running "$SLURMDBD_PID" && return 0
  rm -f "$SLURMDBD_PID"
  run_daemon "$LOG/slurmdbd.stdout" slurmdbd || {
    show_log "$SLURMDBD_LOG"
    die "slurmdbd failed to start"
  }
  wait_for "$START_TIMEOUT" "slurmdbd" dbd_works || {
    show_log "$SLURMDBD_LOG"
    die "slurmdbd is not answering on port $SLURMDBD_PORT"
  }
  log "slurmdbd running on port $SLURMDBD_PORT (pid $(pid_of "$SLURMDBD_PID" || echo '?'))"
}

setup_accounting() {
  if ! sacctmgr -n -P show cluster format=cluster | grep -qxF "$CLUSTER_NAME"; then
    sacctmgr -i -Q add cluster "$CLUSTER_NAME" >/dev/null ||
      die "sacctmgr add cluster $CLUSTER_NAME failed"
  fi
  if ! sacctmgr -n -P show account "$ACCOUNT_NAME" format=account | grep -qxF "$ACCOUNT_NAME"; then
    sacctmgr -i -Q add account "$ACCOUNT_NAME" Cluster="$CLUSTER_NAME" \
      Description="lintrans test jobs" Organization=lintrans >/dev/null ||
      die "sacctmgr add account $ACCOUNT_NAME failed"
  fi
  if ! sacctmgr -n -P show assoc where cluster="$CLUSTER_NAME" account="$ACCOUNT_NAME" \
    user=root format=user | grep -qxF root; then
    sacctmgr -i -Q add user root Account="$ACCOUNT_NAME" Cluster="$CLUSTER_NAME" >/dev/null ||
      die "sacctmgr add user root failed"
  fi
  local def
  def="$(sacctmgr -n -P show user root format=defaultaccount 2>/dev/null || true)"
  if [[ "$def" != "$ACCOUNT_NAME" ]]; then
    sacctmgr -i -Q modify user root set DefaultAccount="$ACCOUNT_NAME" >/dev/null || true
  fi
}

ctld_works() { scontrol ping | grep -q 'is UP'; }

start_slurmctld() {
  is_running "$SLURMCTLD_PID" && return 0
  rm -f "$SLURMCTLD_PID"
  run_daemon "$LOG/slurmctld.stdout" slurmctld -f "$SLURM_CONF_FILE" || {
    show_log "$SLURMCTLD_LOG"
    die "slurmctld failed to start"
  }
  wait_for "$START_TIMEOUT" "slurmctld" ctld_works || {
    show_log "$SLURMCTLD_LOG"
    die "slurmctld is not answering on port $SLURMCTLD_PORT"
  }
  log "slurmctld running on port $SLURMCTLD_PORT (pid $(pid_of "$SLURMCTLD_PID" || echo '?'))"
}

# start_slurmd NODE: a node `localhost` runs slurmd as is; n1..nN each run
# theirs in a private UTS namespace (hostname nI, inherited by its jobs) and
# mount namespace (DIR/etc/hosts bind-mounted on /etc/hosts, so n1..nN
# resolve inside jobs).
start_slurmd() {
  local node="$1" pidfile logfile i pid
  pidfile="$(slurmd_pidfile "$node")"
  logfile="$(slurmd_logfile "$node")"
  is_running "$pidfile" && return 0
  i="$(node_index "$node")" || die "no node $node in this cluster (nodes: ${NODE_NAMES[*]})"
  rm -f "$pidfile"
  if [[ $MULTI -eq 1 ]]; then
    [[ -f "$HOSTS_FILE" ]] || die "$HOSTS_FILE is missing: run start first"
    mkdir -p "$SPOOL_DIR/$node" "$TMP_DIR/$node"
    # shellcheck disable=SC2016 # expanded by the inner sh
    run_daemon "$LOG/slurmd.$node.stdout" unshare --uts --mount --propagation slave -- \
      sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3" -N "$1"' \
      sh "$node" "$HOSTS_FILE" "$SLURM_CONF_FILE" || {
      show_log "$LOG/slurmd.$node.stdout"
      show_log "$logfile"
      die "slurmd $node failed to start"
    }
  else
    run_daemon "$LOG/slurmd.stdout" slurmd -f "$SLURM_CONF_FILE" -N "$node" || {
      show_log "$logfile"
      die "slurmd failed to start"
    }
  fi
  wait_for 10 "slurmd $node pid file" is_running "$pidfile" || {
    show_log "$logfile"
    die "slurmd $node did not start"
  }
  pid="$(pid_of "$pidfile" || echo '?')"
  if [[ $MULTI -eq 1 ]]; then
    ns_of "$pid" >"$(node_ns_file "$node")" || true
    log "slurmd $node running on 127.0.0.$((i + 1)):$(conf_port "$node") (pid $pid)"
  else
    log "slurmd running on port $(conf_port "$node") (pid $pid)"
  fi
}

# conf_port NODE: the slurmd port slurm.conf gives NODE (node-start runs
# without the environment `start` had).
conf_port() {
  local port
  port="$(sed -n "s/^NodeName=$1 .* Port=\([0-9]*\).*/\1/p" "$SLURM_CONF_FILE" | head -n 1)"
  [[ -n "$port" ]] || port="$(sed -n 's/^SlurmdPort=\([0-9]*\).*/\1/p' "$SLURM_CONF_FILE" | head -n 1)"
  printf '%s\n' "${port:-?}"
}

# node_state [NODE]: sinfo's state of NODE (default: the first node).
node_state() { sinfo -h -N -n "${1:-${NODE_NAMES[0]}}" -o '%T' 2>/dev/null | head -n 1; }

# node_usable [NODE...]: every given node (default: all) takes jobs.
node_usable() {
  local node
  [[ $# -gt 0 ]] || set -- "${NODE_NAMES[@]}"
  for node in "$@"; do
    case "$(node_state "$node")" in
      idle | mixed | allocated | completing | planned) ;;
      *) return 1 ;;
    esac
  done
}

node_states() {
  local node out=()
  for node in "${NODE_NAMES[@]}"; do out+=("$node $(node_state "$node")"); done
  (
    IFS=,
    printf '%s' "${out[*]}"
  )
}

all_running() {
  local node
  is_running "$MUNGE_PID" && is_running "$DB_PID" && is_running "$SLURMDBD_PID" &&
    is_running "$SLURMCTLD_PID" || return 1
  for node in "${NODE_NAMES[@]}"; do
    is_running "$(slurmd_pidfile "$node")" || return 1
  done
}

# any_daemon_running: a slurmd (or slurmctld) of this cluster still runs,
# under the node layout stored in DIR.
any_daemon_running() {
  local node
  is_running "$SLURMCTLD_PID" && return 0
  for node in "${NODE_NAMES[@]}"; do
    is_running "$(slurmd_pidfile "$node")" && return 0
  done
  return 1
}

check_binaries() {
  local b missing=()
  for b in munged munge unmunge mariadbd mariadb mariadb-install-db slurmdbd \
    slurmctld slurmd sinfo sacct sacctmgr scontrol setsid; do
    command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    die "missing programs: ${missing[*]} (run slurm/install_system_packages.sh)"
  fi
  [[ "$(id -u)" -eq 0 ]] || die "the test cluster runs its daemons as root; run as root"
}

cmd_start() {
  check_binaries
  local stored node i
  stored="$(stored_nodes || true)"
  if [[ -n "$NODES_ARG" && -n "$stored" && "$NODES_ARG" != "$stored" ]]; then
    # Under the stored layout: are its daemons still up?
    if any_daemon_running; then
      die "the cluster in $DIR runs with $stored node(s); stop it before starting it with --nodes $NODES_ARG"
    fi
  fi
  [[ -z "$NODES_ARG" ]] || set_nodes "$NODES_ARG"
  if [[ -f "$SLURM_CONF_FILE" && "$stored" == "$NODE_COUNT" ]] && all_running && node_usable; then
    log "already running in $DIR (nodes: $(node_states))"
    return 0
  fi
  # Unix socket paths are limited to 107 bytes.
  [[ ${#MUNGE_SOCKET} -le 100 && ${#DB_SOCKET} -le 100 ]] ||
    die "cluster directory path too long for unix sockets: $DIR"
  if [[ $MULTI -eq 1 ]]; then
    command -v unshare >/dev/null 2>&1 || die "missing program: unshare (util-linux)"
    for i in "${!NODE_PORTS[@]}"; do
      [[ "${NODE_PORTS[$i]}" -le 65535 ]] || die "slurmd port ${NODE_PORTS[$i]} is out of range"
    done
  fi
  # Ports of daemons that are not yet running must be free.
  is_running "$DB_PID" ||
    require_free_port "$MYSQL_PORT" MariaDB LINTRANS_SLURM_MYSQL_PORT
  is_running "$SLURMDBD_PID" ||
    require_free_port "$SLURMDBD_PORT" slurmdbd LINTRANS_SLURMDBD_PORT
  is_running "$SLURMCTLD_PID" ||
    require_free_port "$SLURMCTLD_PORT" slurmctld LINTRANS_SLURMCTLD_PORT
  for i in "${!NODE_NAMES[@]}"; do
    is_running "$(slurmd_pidfile "${NODE_NAMES[$i]}")" ||
      require_free_port "${NODE_PORTS[$i]}" "slurmd ${NODE_NAMES[$i]}" LINTRANS_SLURMD_PORT
  done
  # Rewriting the configs of running daemons with other ports would cut
  # them off from their clients.
  local running_port
  if is_running "$SLURMCTLD_PID" && [[ -f "$SLURM_CONF_FILE" ]]; then
    running_port="$(sed -n 's/^SlurmctldPort=\([0-9]*\).*/\1/p' "$SLURM_CONF_FILE")"
    [[ "$running_port" == "$SLURMCTLD_PORT" ]] ||
      die "slurmctld of $DIR runs on port $running_port, not $SLURMCTLD_PORT: start it with the LINTRANS_* port variables it was started with (or stop it first)"
  fi
  if is_running "$SLURMDBD_PID" && [[ -f "$SLURMDBD_CONF_FILE" ]]; then
    running_port="$(sed -n 's/^DbdPort=\([0-9]*\).*/\1/p' "$SLURMDBD_CONF_FILE")"
    [[ "$running_port" == "$SLURMDBD_PORT" ]] ||
      die "slurmdbd of $DIR runs on port $running_port, not $SLURMDBD_PORT: start it with the LINTRANS_* port variables it was started with (or stop it first)"
  fi
  local t0=$SECONDS
  mkdir -p "$DIR"
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  setup_accounting
  start_slurmctld
  for node in "${NODE_NAMES[@]}"; do
    start_slurmd "$node"
  done
  wait_for "$START_TIMEOUT" "node(s) ${NODE_NAMES[*]} to become idle" node_usable || {
    sinfo -N -l >&2 || true
    for node in "${NODE_NAMES[@]}"; do show_log "$(slurmd_logfile "$node")"; done
    show_log "$SLURMCTLD_LOG"
    die "not every node is usable (states: $(node_states))"
  }
  # slurmctld registers with slurmdbd asynchronously; make sure sacct answers.
  wait_for "$START_TIMEOUT" "sacct" sacct -n -X -a -S now-1minutes -o jobid || die "sacct does not work"
  if [[ $MULTI -eq 1 ]]; then
    log "cluster '$CLUSTER_NAME' up in $DIR after $((SECONDS - t0))s (nodes: $(node_states))"
  else
    log "cluster '$CLUSTER_NAME' up in $DIR after $((SECONDS - t0))s (node $(node_state))"
  fi
  log "use it with: eval \"\$(${BASH_SOURCE[0]} env${POSITIONAL[0]:+ $DIR})\""
}

cmd_node_kill() {
  local node="$1" n
  node_index "$node" >/dev/null || die "no node $node in the cluster in $DIR (nodes: ${NODE_NAMES[*]})"
  n="$(kill_node "$node")"
  if [[ "$n" -eq 0 ]]; then
    log "node $node had no process (already down?)"
  else
    log "killed node $node: $n process(es) (slurmd, slurmstepd, job tasks)"
  fi
}

cmd_node_start() {
  local node="$1"
  node_index "$node" >/dev/null || die "no node $node in the cluster in $DIR (nodes: ${NODE_NAMES[*]})"
  [[ -f "$SLURM_CONF_FILE" ]] || die "no cluster in $DIR: run start first"
  is_running "$SLURMCTLD_PID" || die "slurmctld is not running in $DIR: run start"
  if is_running "$(slurmd_pidfile "$node")"; then
    log "slurmd $node is already running (node $(node_state "$node"))"
  else
    # A node is a machine: a new slurmd means a rebooted one. Steps left in
    # its old namespace (slurmd died alone) would otherwise run on and make
    # the requeued job fail with "Job credential revoked".
    [[ $MULTI -eq 0 ]] || kill_node "$node" >/dev/null
    start_slurmd "$node"
  fi
  # ReturnToService=2: a DOWN node is back as soon as its slurmd registers.
  wait_for "$START_TIMEOUT" "node $node to become usable" node_usable "$node" || {
    show_log "$(slurmd_logfile "$node")"
    die "node $node is not usable (state: $(node_state "$node"))"
  }
  log "node $node $(node_state "$node")"
}

cancel_all_jobs() {
  is_running "$SLURMCTLD_PID" || return 0
  local jobs
  jobs="$(squeue -h -o '%A' 2>/dev/null || true)"
  [[ -n "$jobs" ]] || return 0
  log "cancelling $(wc -w <<<"$jobs") job(s)"
  # shellcheck disable=SC2086 # one job id per word
  scancel $jobs 2>/dev/null || true
  wait_for 15 "jobs to finish" no_jobs_left || true
}

no_jobs_left() { [[ -z "$(squeue -h -o '%A' 2>/dev/null)" ]]; }

cmd_stop() {
  if [[ ! -d "$DIR" ]]; then
    log "nothing to stop: $DIR does not exist"
    return 0
  fi
  [[ -f "$SLURM_CONF_FILE" ]] && cancel_all_jobs
  # Each daemon takes 1-3 s to exit: stop independent ones in parallel.
  # slurmctld flushes job records to slurmdbd (which needs MariaDB and
  # munge) before exiting, so those go afterwards.
  local node
  for node in "${NODE_NAMES[@]}"; do
    stop_pidfile "$(slurmd_label "$node")" "$(slurmd_pidfile "$node")" &
  done
  stop_pidfile slurmctld "$SLURMCTLD_PID" &
  wait
  stop_pidfile slurmdbd "$SLURMDBD_PID"
  stop_pidfile mariadbd "$DB_PID" 60 &
  stop_pidfile munged "$MUNGE_PID" &
  wait
  # Stragglers of this cluster (slurmstepd and job steps, crashed daemons
  # whose pid file is gone, anything left in a node's namespaces).
  local left
  if [[ $MULTI -eq 1 ]]; then
    for node in "${NODE_NAMES[@]}"; do
      left="$(kill_node "$node")"
      [[ "$left" -eq 0 ]] || log "killed $left leftover process(es) of node $node"
    done
  fi
  left="$(cluster_pids | tr '\n' ' ')"
  if [[ -n "${left// /}" ]]; then
    log "killing leftover processes: $left"
    # shellcheck disable=SC2086 # one pid per word
    kill -TERM $left 2>/dev/null || true
    sleep 1
    left="$(cluster_pids | tr '\n' ' ')"
    # shellcheck disable=SC2086
    [[ -z "${left// /}" ]] || kill -KILL $left 2>/dev/null || true
  fi
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$DB_SOCKET" "$DB_SOCKET.lock"
  log "stopped cluster in $DIR"
}

cmd_status() {
  local name pidfile pid node rc=0
  printf 'cluster dir: %s\n' "$DIR"
  for name in munged mariadbd slurmdbd slurmctld; do
    case "$name" in
      munged) pidfile="$MUNGE_PID" ;;
      mariadbd) pidfile="$DB_PID" ;;
      slurmdbd) pidfile="$SLURMDBD_PID" ;;
      slurmctld) pidfile="$SLURMCTLD_PID" ;;
    esac
    if pid="$(pid_of "$pidfile")"; then
      printf '  %-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '  %-10s stopped\n' "$name"
      rc=1
    fi
  done
  for node in "${NODE_NAMES[@]}"; do
    name="$(slurmd_label "$node")"
    if pid="$(pid_of "$(slurmd_pidfile "$node")")"; then
      printf '  %-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '  %-10s stopped\n' "$name"
      rc=1
    fi
  done
  if is_running "$SLURMCTLD_PID" && [[ -f "$SLURM_CONF_FILE" ]]; then
    for node in "${NODE_NAMES[@]}"; do
      sinfo -h -N -n "$node" \
        -o '  node %N: partition %P, %T, cpus=%c, mem=%mM, gres=%G, addr=%o' 2>/dev/null || true
    done
  fi
  local others
  others="$(cluster_pids | wc -l)"
  printf '  processes of this cluster: %s\n' "$others"
  return "$rc"
}

cmd_env() {
  printf 'export SLURM_CONF=%q\n' "$SLURM_CONF_FILE"
  printf 'export LINTRANS_SLURM_DIR=%q\n' "$DIR"
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  node-kill) cmd_node_kill "$TARGET_NODE" ;;
  node-start) cmd_node_start "$TARGET_NODE" ;;
  -h | --help | help) usage 0 ;;
  *) usage ;;
esac
