#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for development and tests.
# See slurm/README.md. Run `bash slurm/cluster.sh --help`.
set -euo pipefail

PROG=$(basename "$0")
PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge slurmdbd mariadb-server mariadb-client)
DAEMONS=(mariadbd munged slurmdbd slurmctld slurmd)   # start order; stop goes in reverse
WAIT_S=${HALP_SLURM_WAIT:-60}

usage() {
  cat <<EOF
Usage: bash slurm/cluster.sh COMMAND [--dir DIR]

A single-node Slurm cluster on localhost (Debian's Slurm 22.05) with real accounting
(slurmdbd + MariaDB), run as root from a state directory. No systemd needed.

Commands:
  install         apt-get install the Debian packages if any is missing (needs root + apt-get):
                  ${PACKAGES[*]}
  start           write configs, start mariadbd, munged, slurmdbd, slurmctld, slurmd in the
                  background, wait until the node is idle and accounting answers, then print
                  the export line(s) and write DIR/env.sh. Says so and exits 0 if already up.
  stop            stop only the daemons this script started (PIDs in DIR/pids/*.pid), wait
                  for them to exit. Exits 0 if nothing is running.
  status          which recorded daemons are alive, and sinfo.
  env             print the export line(s) for clients (eval "\$(bash $PROG env)").
  -h, --help      this text.

Options:
  --dir DIR       state directory (default: \$HALP_SLURM_DIR or /tmp/halp-slurm).

Environment:
  HALP_SLURM_DIR        default state directory (/tmp/halp-slurm)
  HALP_SLURM_PORT       first of 4 TCP ports on 127.0.0.1 (default 6817): slurmctld=PORT,
                        slurmd=PORT+1, slurmdbd=PORT+2, mariadbd=PORT+3
  HALP_SLURM_PARTITION  partition name (default debug)
  HALP_SLURM_WAIT       seconds to wait for each daemon (default 60)

Cluster name "halp", account "halp" (root and the calling user are members).
Clients need only SLURM_CONF=DIR/etc/slurm.conf.
EOF
}

say() { printf '[slurm] %s\n' "$*" >&2; }
die() { printf '[slurm] error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- arguments
CMD=${1:-}
[ $# -gt 0 ] && shift
DIR=${HALP_SLURM_DIR:-/tmp/halp-slurm}
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) [ $# -ge 2 ] || die "--dir needs a value"; DIR=$2; shift 2 ;;
    --dir=*) DIR=${1#--dir=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$CMD" in
  ""|-h|--help|help) usage; exit 0 ;;
esac
DIR=$(realpath -m -- "$DIR")   # absolute, so the configs work from any cwd

PORT=${HALP_SLURM_PORT:-6817}
CTLD_PORT=$PORT; SLURMD_PORT=$((PORT + 1)); DBD_PORT=$((PORT + 2)); DB_PORT=$((PORT + 3))
PARTITION=${HALP_SLURM_PARTITION:-debug}
CLUSTER=halp
ACCOUNT=halp
ETC=$DIR/etc; LOG=$DIR/log; RUN=$DIR/run; PIDS=$DIR/pids
MUNGE_DIR=$DIR/munge; MUNGE_SOCK_DIR=$MUNGE_DIR/sock; MUNGE_SOCK=$MUNGE_SOCK_DIR/munge.socket
DB_DATA=$DIR/mysql; DB_SOCK=$RUN/mysqld.sock
CONF=$ETC/slurm.conf

export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF=$CONF

# ---------------------------------------------------------------- helpers
# The executable name each recorded PID must have (guards against a recycled PID).
expected_comm() {
  case "$1" in
    mariadbd) echo "mariadbd mysqld" ;;
    *) echo "$1" ;;
  esac
}

# Prints the PID recorded for daemon $1 if that process is alive and is that daemon.
live_pid() {
  local name=$1 f=$PIDS/$1.pid pid comm c
  [ -f "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ -r "/proc/$pid/comm" ] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  # A zombie is not running.
  [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 1
  for c in $(expected_comm "$name"); do
    [ "$comm" = "$c" ] && { echo "$pid"; return 0; }
  done
  return 1
}

any_alive() { local d; for d in "${DAEMONS[@]}"; do live_pid "$d" >/dev/null && return 0; done; return 1; }
all_alive() { local d; for d in "${DAEMONS[@]}"; do live_pid "$d" >/dev/null || return 1; done; return 0; }

need_root() { [ "$(id -u)" = 0 ] || die "$1 must run as root (this cluster runs its daemons as root)"; }

missing_packages() {
  local p out=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || out+=("$p")
  done
  echo "${out[*]}"
}

need_binaries() {
  local b
  for b in munged munge mungekey slurmctld slurmd slurmdbd sinfo sacctmgr mariadbd mariadb-install-db mariadb mariadb-admin; do
    command -v "$b" >/dev/null || die "$b not found: run 'bash $0 install' first (as root)"
  done
}

port_in_use() {  # $1 = port; true if something listens on it (TCP, any address)
  local hex; hex=$(printf '%04X' "$1")
  awk -v h=":$hex" 'NR > 1 && $4 == "0A" && substr($2, length($2) - 4) == h { f = 1 } END { exit !f }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

tail_log() { [ -f "$1" ] && { say "--- last lines of $1"; tail -n 20 "$1" >&2; }; return 0; }

# wait_for NAME LOGFILE COMMAND...: poll COMMAND until it succeeds, while daemon NAME stays alive.
wait_for() {
  local name=$1 logf=$2; shift 2
  local deadline=$((SECONDS + WAIT_S))
  while ! "$@" >/dev/null 2>&1; do
    if ! live_pid "$name" >/dev/null; then
      tail_log "$logf"; tail_log "$LOG/$name.out"; fail "$name exited during start-up"
    fi
    [ $SECONDS -lt $deadline ] || { tail_log "$logf"; fail "$name not ready after ${WAIT_S}s"; }
    sleep 0.2
  done
}

# launch NAME LOGFILE COMMAND...: run in the background in its own session, record its PID.
launch() {
  local name=$1 logf=$2; shift 2
  # The daemon writes its own log file; what it prints goes to LOG/NAME.out.
  setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
  local pid=$!
  echo "$pid" >"$PIDS/$name.pid"
  # setsid execs in place (we are not a process-group leader), so $! is the daemon itself;
  # give it a moment to exec, then check.
  local i
  for i in $(seq 50); do live_pid "$name" >/dev/null && return 0; sleep 0.1; done
  tail_log "$logf"; tail_log "$LOG/$name.out"; fail "$name did not start (pid $pid)"
}

STARTING=0
fail() {
  say "$1"
  if [ "$STARTING" = 1 ]; then say "stopping what was started"; do_stop quiet || true; fi
  exit 1
}

kill_and_wait() {  # $1 = daemon name
  local name=$1 pid i
  pid=$(live_pid "$name") || { rm -f "$PIDS/$name.pid"; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 300); do   # up to 30 s
    live_pid "$name" >/dev/null || break
    sleep 0.1
  done
  if live_pid "$name" >/dev/null; then
    say "$name (pid $pid) ignored SIGTERM for 30 s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for i in $(seq 50); do live_pid "$name" >/dev/null || break; sleep 0.1; done
  fi
  rm -f "$PIDS/$name.pid"
  [ "${2:-}" = quiet ] || say "stopped $name (pid $pid)"
}

print_env() {
  local part
  part=$(sed -n 's/^PartitionName=\([^ ]*\).*/\1/p' "$CONF" 2>/dev/null | head -n 1)
  printf 'export SLURM_CONF=%q\n' "$CONF"
  printf 'export HALP_SLURM_DIR=%q\n' "$DIR"
  printf 'export HALP_SLURM_PARTITION=%q\n' "${part:-$PARTITION}"
}

# ---------------------------------------------------------------- install
do_install() {
  local missing
  command -v dpkg-query >/dev/null && command -v apt-get >/dev/null \
    || die "install needs Debian's apt-get and dpkg (not found); install Slurm, munge, slurmdbd and MariaDB yourself"
  mkdir -p "$DIR"
  missing=$(missing_packages)
  if [ -z "$missing" ]; then say "packages already installed: ${PACKAGES[*]}"; return 0; fi
  need_root "install"
  say "installing: $missing"
  # shellcheck disable=SC2086
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >"$DIR/apt.log" 2>&1; then
    say "apt-get install failed; running apt-get update and retrying"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR/apt.log" 2>&1 || true
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing >>"$DIR/apt.log" 2>&1 \
      || { tail -n 20 "$DIR/apt.log" >&2; die "apt-get install failed (full log: $DIR/apt.log)"; }
  fi
  missing=$(missing_packages)
  [ -z "$missing" ] || die "still missing after install: $missing (log: $DIR/apt.log)"
  say "installed"
}

# ---------------------------------------------------------------- configs
real_memory_mb() {
  # MemAvailable minus 10% and minus 512 MB, at least 256 MB: below what is free, so the node
  # never registers with more memory than it has.
  local avail
  avail=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
  [ -n "$avail" ] || avail=$(awk '/^MemFree:/ {print int($2 / 1024)}' /proc/meminfo)
  avail=$((avail * 9 / 10 - 512))
  [ "$avail" -ge 256 ] || avail=256
  echo "$avail"
}

write_configs() {
  local cpus mem users u
  cpus=$(nproc)
  mem=$(real_memory_mb)
  cat >"$CONF" <<EOF
# Written by slurm/cluster.sh; rewritten on every start.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
# Look at pending jobs (e.g. a requeued one whose begin time has passed) every few seconds.
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# The slurmctld -> slurmdbd connection ignores AuthInfo=socket=; it takes the socket from here.
AccountingStoragePass=$MUNGE_SOCK
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/cluster.sh; rewritten on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$ETC/db.pass")
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$ETC/slurmdbd.conf"
}

# ---------------------------------------------------------------- start
do_start() {
  need_root "start"
  need_binaries
  mkdir -p "$ETC" "$LOG" "$RUN" "$PIDS" "$DIR/state/ctld" "$DIR/state/slurmd" "$MUNGE_SOCK_DIR"

  if all_alive; then
    say "already running (state dir $DIR)"
    print_env
    return 0
  fi
  if any_alive; then
    say "some daemons of $DIR are running but not all: stopping them and starting afresh"
    do_stop
  fi
  rm -f "$PIDS"/*.pid
  local p
  for p in $CTLD_PORT $SLURMD_PORT $DBD_PORT $DB_PORT; do
    port_in_use "$p" && die "TCP port $p is in use (another cluster?): set HALP_SLURM_PORT to another base port"
  done

  STARTING=1
  local t0=$SECONDS

  # Secrets: munge key and the MariaDB password for slurmdbd, made once per state dir.
  # munged wants every directory above its socket searchable by all (x), none writable by others.
  chmod 711 "$MUNGE_DIR" "$MUNGE_SOCK_DIR"; chmod 700 "$ETC"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    (umask 077; head -c 1024 /dev/urandom >"$MUNGE_DIR/munge.key")
  fi
  chmod 400 "$MUNGE_DIR/munge.key"
  if [ ! -s "$ETC/db.pass" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=\n' >"$ETC/db.pass")
  fi
  write_configs

  # 1. MariaDB, data in DIR/mysql, TCP on 127.0.0.1 only.
  local db_fresh=0
  if [ ! -d "$DB_DATA/mysql" ]; then
    db_fresh=1
    mkdir -p "$DB_DATA"
    mariadb-install-db --no-defaults --user=root --datadir="$DB_DATA" --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 \
      || { tail_log "$LOG/mariadb-install.log"; fail "mariadb-install-db failed"; }
  fi
  launch mariadbd "$LOG/mariadbd.log" mariadbd --no-defaults --user=root --datadir="$DB_DATA" \
    --socket="$DB_SOCK" --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$RUN/mariadbd.pid" \
    --log-error="$LOG/mariadbd.log" --skip-log-bin --innodb-buffer-pool-size=128M \
    --innodb-log-file-size=64M --innodb-lock-wait-timeout=900 --max-connections=100
  wait_for mariadbd "$LOG/mariadbd.log" mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping
  local pass; pass=$(cat "$ETC/db.pass")
  mariadb --no-defaults --socket="$DB_SOCK" -uroot >>"$LOG/mariadb-install.log" 2>&1 <<EOF || fail "could not create the MariaDB user for slurmdbd"
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pass';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
  [ "$db_fresh" = 0 ] || say "initialised MariaDB in $DB_DATA"

  # 2. munged with our own key and socket.
  launch munged "$LOG/munged.log" munged -F --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCK" \
    --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed"
  wait_for munged "$LOG/munged.log" bash -c "munge -n --socket='$MUNGE_SOCK' | unmunge --socket='$MUNGE_SOCK'"

  # 3. slurmdbd, then the cluster, account and users (needed before slurmctld registers).
  launch slurmdbd "$LOG/slurmdbd.log" slurmdbd -D
  wait_for slurmdbd "$LOG/slurmdbd.log" sacctmgr -n show cluster
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >>"$LOG/sacctmgr.log" 2>&1 || fail "sacctmgr add cluster failed"
  fi
  if ! sacctmgr -n -P show account "$ACCOUNT" format=account | grep -qx "$ACCOUNT"; then
    sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" description="halp local cluster" \
      organization=halp >>"$LOG/sacctmgr.log" 2>&1 || fail "sacctmgr add account failed"
  fi
  local users="root" u
  if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then users="$users $SUDO_USER"; fi
  for u in $users; do
    if ! sacctmgr -n -P show assoc where user="$u" account="$ACCOUNT" cluster="$CLUSTER" format=user | grep -qx "$u"; then
      sacctmgr -i add user "$u" account="$ACCOUNT" cluster="$CLUSTER" defaultaccount="$ACCOUNT" \
        >>"$LOG/sacctmgr.log" 2>&1 || fail "sacctmgr add user $u failed"
    fi
  done

  # 4. slurmctld (-i: ignore saved state from an earlier run) and slurmd.
  launch slurmctld "$LOG/slurmctld.log" slurmctld -D -i
  wait_for slurmctld "$LOG/slurmctld.log" scontrol ping
  launch slurmd "$LOG/slurmd.log" slurmd -D -N localhost
  local deadline=$((SECONDS + WAIT_S)) state=""
  while :; do
    state=$(sinfo -h -n localhost -o '%T' 2>/dev/null | head -n 1 || true)
    case "$state" in idle|idle~|mixed|allocated) break ;; esac
    live_pid slurmd >/dev/null || { tail_log "$LOG/slurmd.log"; fail "slurmd exited during start-up"; }
    live_pid slurmctld >/dev/null || { tail_log "$LOG/slurmctld.log"; fail "slurmctld exited during start-up"; }
    if [ $SECONDS -ge $deadline ]; then
      tail_log "$LOG/slurmd.log"; tail_log "$LOG/slurmctld.log"
      fail "node not idle after ${WAIT_S}s (state: ${state:-none})"
    fi
    sleep 0.2
  done
  # Accounting answers through slurmctld too.
  wait_for slurmctld "$LOG/slurmctld.log" sacct -n -X -S now
  STARTING=0

  print_env >"$DIR/env.sh"
  say "up in $((SECONDS - t0)) s: partition '$PARTITION', node localhost ($(nproc) CPUs), state dir $DIR"
  say "logs in $LOG; to use it: source $DIR/env.sh"
  print_env
}

# ---------------------------------------------------------------- stop / status
do_stop() {
  local quiet=${1:-} d i stopped=0
  [ -d "$PIDS" ] || { [ -n "$quiet" ] || say "not running (no $PIDS)"; return 0; }
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    d=${DAEMONS[$i]}
    if live_pid "$d" >/dev/null; then kill_and_wait "$d" "$quiet"; stopped=1; fi
    rm -f "$PIDS/$d.pid"
  done
  [ -n "$quiet" ] || { [ "$stopped" = 1 ] && say "stopped (state kept in $DIR)" || say "not running"; }
  return 0
}

do_status() {
  local d pid up=0
  say "state dir $DIR"
  for d in "${DAEMONS[@]}"; do
    if pid=$(live_pid "$d"); then printf '  %-10s running  pid %s\n' "$d" "$pid"; up=$((up + 1))
    else printf '  %-10s stopped\n' "$d"; fi
  done
  if [ "$up" = "${#DAEMONS[@]}" ]; then
    sinfo || true
    print_env
    return 0
  fi
  [ "$up" = 0 ] && say "not running" || say "partly running: 'stop' then 'start'"
  return 3
}

case "$CMD" in
  install) do_install ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  env)
    [ -f "$CONF" ] || die "no cluster config in $DIR: run 'bash $0 start' first"
    print_env ;;
  *) die "unknown command: $CMD (see --help)" ;;
esac
