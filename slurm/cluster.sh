#!/usr/bin/env bash
# Single-node SLURM 22.05 test cluster for lintrans (Debian 12, run as root,
# no systemd, no cgroups). Every file (munge key and socket, MariaDB data,
# configs, state, logs, pid files) lives under one directory.
#
#   slurm/cluster.sh start  [DIR]   start (or finish starting) the cluster
#   slurm/cluster.sh stop   [DIR]   cancel jobs, stop every daemon (idempotent)
#   slurm/cluster.sh status [DIR]   show daemons and node state
#   slurm/cluster.sh env    [DIR]   print exports for clients:
#                                   eval "$(slurm/cluster.sh env)"
#
# DIR defaults to ${LINTRANS_SLURM_DIR:-/tmp/lintrans-slurm}.
# Packages: slurm/install_system_packages.sh.  Details: slurm/README.md.
set -euo pipefail

usage() {
  sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

[[ $# -ge 1 && $# -le 2 ]] || usage
CMD="$1"
DIR="${2:-${LINTRANS_SLURM_DIR:-/tmp/lintrans-slurm}}"
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
if [[ -n "${LINTRANS_SLURM_REAL_MEMORY:-}" ]]; then
  REAL_MEMORY="$LINTRANS_SLURM_REAL_MEMORY"
else
  # 95% of MemTotal in MiB: slurmd drains a node whose RealMemory exceeds
  # what it measures.
  REAL_MEMORY="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.95 }' /proc/meminfo)"
fi
DEF_MEM_PER_CPU="$((REAL_MEMORY / NODE_CPUS))"

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
SLURMD_PID="$RUN/slurmd.pid"
SLURMDBD_PID="$RUN/slurmdbd.pid"
SLURMCTLD_LOG="$LOG/slurmctld.log"
SLURMD_LOG="$LOG/slurmd.log"
SLURMDBD_LOG="$LOG/slurmdbd.log"
NODE_NAME="localhost"

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

# All live processes that carry this cluster's marker, plus their
# descendants (job steps started by slurmstepd).
cluster_pids() {
  local p pid stat rest ppid
  local -A parent=()
  local -a roots=()
  for p in /proc/[0-9]*; do
    pid="${p#/proc/}"
    [[ "$pid" == "$$" || "$pid" == "${BASHPID:-}" ]] && continue
    stat="$(cat "$p/stat" 2>/dev/null)" || continue
    rest="${stat##*) }"
    read -r _ ppid _ <<<"$rest"
    parent["$pid"]="$ppid"
    if grep -qzxF -- "$MARKER" "$p/environ" 2>/dev/null; then
      roots+=("$pid")
    fi
  done
  [[ ${#roots[@]} -gt 0 ]] || return 0
  local -A keep=()
  for pid in "${roots[@]}"; do keep["$pid"]=1; done
  # Close the set under "child of": iterate until no change.
  local changed=1
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
  if [[ ! -s "$DB_PASS_FILE" ]]; then
    (umask 0077 && head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 24 >"$DB_PASS_FILE")
  fi
  chmod 0600 "$DB_PASS_FILE"

  local tmp
  tmp="$(mktemp "$ETC/.slurm.conf.XXXXXX")"
  cat >"$tmp" <<EOF
# Generated by slurm/cluster.sh -- single-node lintrans test cluster.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE_NAME(127.0.0.1)
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
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$SLURMCTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
TmpFS=$TMP_DIR
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
SlurmdTimeout=60
SlurmdParameters=config_overrides

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE_NAME
AccountingStoragePort=$SLURMDBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobCompType=jobcomp/none

NodeName=$NODE_NAME NodeHostname=$NODE_NAME NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$REAL_MEMORY State=UNKNOWN
PartitionName=debug Nodes=$NODE_NAME Default=YES MaxTime=INFINITE State=UP
EOF
  chmod 0644 "$tmp"
  mv -f "$tmp" "$SLURM_CONF_FILE"

  tmp="$(mktemp "$ETC/.slurmdbd.conf.XXXXXX")"
  cat >"$tmp" <<EOF
# Generated by slurm/cluster.sh -- single-node lintrans test cluster.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=$NODE_NAME
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

start_slurmd() {
  is_running "$SLURMD_PID" && return 0
  rm -f "$SLURMD_PID"
  run_daemon "$LOG/slurmd.stdout" slurmd -f "$SLURM_CONF_FILE" -N "$NODE_NAME" || {
    show_log "$SLURMD_LOG"
    die "slurmd failed to start"
  }
  wait_for 10 "slurmd pid file" is_running "$SLURMD_PID" || {
    show_log "$SLURMD_LOG"
    die "slurmd did not start"
  }
  log "slurmd running on port $SLURMD_PORT (pid $(pid_of "$SLURMD_PID" || echo '?'))"
}

node_state() { sinfo -h -N -n "$NODE_NAME" -o '%T' 2>/dev/null | head -n 1; }

node_usable() {
  case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

all_running() {
  is_running "$MUNGE_PID" && is_running "$DB_PID" && is_running "$SLURMDBD_PID" &&
    is_running "$SLURMCTLD_PID" && is_running "$SLURMD_PID"
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
  if [[ -f "$SLURM_CONF_FILE" ]] && all_running && node_usable; then
    log "already running in $DIR (node $(node_state))"
    return 0
  fi
  # Unix socket paths are limited to 107 bytes.
  [[ ${#MUNGE_SOCKET} -le 100 && ${#DB_SOCKET} -le 100 ]] ||
    die "cluster directory path too long for unix sockets: $DIR"
  # Ports of daemons that are not yet running must be free.
  is_running "$DB_PID" ||
    require_free_port "$MYSQL_PORT" MariaDB LINTRANS_SLURM_MYSQL_PORT
  is_running "$SLURMDBD_PID" ||
    require_free_port "$SLURMDBD_PORT" slurmdbd LINTRANS_SLURMDBD_PORT
  is_running "$SLURMCTLD_PID" ||
    require_free_port "$SLURMCTLD_PORT" slurmctld LINTRANS_SLURMCTLD_PORT
  is_running "$SLURMD_PID" ||
    require_free_port "$SLURMD_PORT" slurmd LINTRANS_SLURMD_PORT
  local t0=$SECONDS
  mkdir -p "$DIR"
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  setup_accounting
  start_slurmctld
  start_slurmd
  wait_for "$START_TIMEOUT" "node $NODE_NAME to become idle" node_usable || {
    sinfo -N -l >&2 || true
    show_log "$SLURMD_LOG"
    show_log "$SLURMCTLD_LOG"
    die "node $NODE_NAME is not usable (state: $(node_state))"
  }
  # slurmctld registers with slurmdbd asynchronously; make sure sacct answers.
  wait_for "$START_TIMEOUT" "sacct" sacct -n -X -a -S now-1minutes -o jobid || die "sacct does not work"
  log "cluster '$CLUSTER_NAME' up in $DIR after $((SECONDS - t0))s (node $(node_state))"
  log "use it with: eval \"\$(${BASH_SOURCE[0]} env${2:+ $DIR})\""
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
  stop_pidfile slurmd "$SLURMD_PID" &
  stop_pidfile slurmctld "$SLURMCTLD_PID" &
  wait
  stop_pidfile slurmdbd "$SLURMDBD_PID"
  stop_pidfile mariadbd "$DB_PID" 60 &
  stop_pidfile munged "$MUNGE_PID" &
  wait
  # Stragglers of this cluster (slurmstepd and job steps, crashed daemons
  # whose pid file is gone).
  local left
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
  local name pidfile pid rc=0
  printf 'cluster dir: %s\n' "$DIR"
  for name in munged mariadbd slurmdbd slurmctld slurmd; do
    case "$name" in
      munged) pidfile="$MUNGE_PID" ;;
      mariadbd) pidfile="$DB_PID" ;;
      slurmdbd) pidfile="$SLURMDBD_PID" ;;
      slurmctld) pidfile="$SLURMCTLD_PID" ;;
      slurmd) pidfile="$SLURMD_PID" ;;
    esac
    if pid="$(pid_of "$pidfile")"; then
      printf '  %-10s running (pid %s)\n' "$name" "$pid"
    else
      printf '  %-10s stopped\n' "$name"
      rc=1
    fi
  done
  if is_running "$SLURMCTLD_PID" && [[ -f "$SLURM_CONF_FILE" ]]; then
    sinfo -h -N -o '  node %N: partition %P, %T, cpus=%c, mem=%mM' 2>/dev/null || true
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
  start) cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  -h | --help | help) usage 0 ;;
  *) usage ;;
esac
