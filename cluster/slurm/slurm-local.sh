#!/usr/bin/env bash
# slurm-local.sh: a real single-node Slurm cluster on localhost, for tests and CI.
#
#   bash cluster/slurm/slurm-local.sh start    # install (apt) if needed, configure, start, wait until usable
#   bash cluster/slurm/slurm-local.sh stop     # cancel all jobs, stop every daemon by its pid file
#   bash cluster/slurm/slurm-local.sh status   # daemon state + sinfo; exit status 0 only when usable
#
# Knobs (environment variables, read by `start`):
#   SLURM_LOCAL_ACCOUNTING=1      slurmdbd + MariaDB, so sacct works (submitit needs it); 0 = none
#   SLURM_LOCAL_GPUS=2            fake GPUs (symlinks to /dev/null); 0 = no GRES
#   SLURM_LOCAL_CPUS=8            CPUs the node advertises (config_overrides; may exceed the real cores)
#   SLURM_LOCAL_PARTITION=debug   name of the only (default) partition
#   SLURM_LOCAL_CLUSTER=localci   ClusterName (lowercase letters, digits, _)
#   SLURM_LOCAL_MAX_ARRAY_SIZE=1001  slurm.conf MaxArraySize (Slurm's default; highest index is N-1)
#   SLURM_LOCAL_TIMEOUT=90        seconds to wait for each readiness step before failing
#
# Debian 12 packages (22.05), no systemd needed: every daemon is started directly and tracked by
# its pid file; nothing is ever found or killed by process name. Facts and pitfalls behind every
# setting: cluster/slurm/README.md.
set -euo pipefail
umask 022

ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
GPUS=${SLURM_LOCAL_GPUS:-2}
CPUS=${SLURM_LOCAL_CPUS:-8}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CLUSTER=${SLURM_LOCAL_CLUSTER:-localci}
MAX_ARRAY_SIZE=${SLURM_LOCAL_MAX_ARRAY_SIZE:-1001}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}

ETC=/etc/slurm
STATE=/var/lib/slurm-local            # lock file, fake GPU device links
FAKEGPU=$STATE/fakegpu
OWNLOG=/var/log/slurm-local           # apt output, mariadbd output
SLURMLOG=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld       # keep together with the MariaDB data (job ids vs sacct rows)
SLURMD_SPOOL=/var/spool/slurmd
MARIADB_CNF=/etc/mysql/mariadb.conf.d/99-slurm-local.cnf
REAL_MEMORY_MB=16000
# Daemons get a clean environment: nothing from the caller (CUDA_VISIBLE_DEVICES, SLURM_*) leaks in.
DAEMON_ENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root)

declare -A PIDFILE=(
  [munged]=/run/munge/munged.pid
  [mariadbd]=/run/mysqld/mysqld.pid
  [slurmdbd]=/run/slurmdbd.pid
  [slurmctld]=/run/slurmctld.pid
  [slurmd]=/run/slurmd.pid
)
declare -A LOGFILE=(
  [munged]=/var/log/munge/munged.log
  [mariadbd]=$OWNLOG/mariadbd.log
  [slurmdbd]=$SLURMLOG/slurmdbd.log
  [slurmctld]=$SLURMLOG/slurmctld.log
  [slurmd]=$SLURMLOG/slurmd.log
)
ALL_DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { printf 'slurm-local: %s\n' "$*" >&2; }
die() { printf 'slurm-local: ERROR: %s\n' "$*" >&2; exit 1; }

# die, showing the tail of the log that explains the failure and naming it.
die_with_log() {
  local msg=$1 file=$2
  if [[ -r $file ]]; then
    printf 'slurm-local: ---- last lines of %s ----\n' "$file" >&2
    tail -n 25 "$file" >&2 || true
    printf 'slurm-local: ----\n' >&2
  fi
  die "$msg; read $file"
}

now() { printf '%s' "${EPOCHREALTIME:-$(date +%s.%N)}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

need_root() { [[ $EUID -eq 0 ]] || die "'$1' must run as root (it installs packages and starts daemons)"; }

# ---------------------------------------------------------------- pid-file based process tracking

# Print the pid stored in a pid file; tolerate the file being absent or vanishing (munged deletes
# its own pid file as it exits).
pid_from_file() {
  local f=$1 p=""
  { read -r p <"$f"; } 2>/dev/null || true
  [[ $p =~ ^[0-9]+$ ]] && printf '%s' "$p"
  return 0
}

# True when PID is a live (not zombie) process running the program WANT. Checks /proc/PID/stat for
# the state and /proc/PID/exe (root) or /proc/PID/comm for the program, so a stale pid file whose
# pid was reused by something else reads as stopped. Zombies count as stopped: after `stop`, PID 1
# of a sandbox may reap them late.
pid_alive() {
  local pid=$1 want=$2 stat state exe comm
  [[ -n $pid ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  state=${stat##*) }
  state=${state%% *}
  [[ $state != Z && $state != X ]] || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  exe=${exe% (deleted)}
  exe=${exe##*/}
  comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
  [[ $exe == "$want" || $comm == "$want" ]]
}

# Print the daemon's pid when it runs; return 1 otherwise.
daemon_pid() {
  local name=$1 pid
  pid=$(pid_from_file "${PIDFILE[$name]}")
  pid_alive "$pid" "$name" || return 1
  printf '%s' "$pid"
}

daemon_running() { daemon_pid "$1" >/dev/null; }

stop_daemon() {
  local name=$1 pid deadline
  pid=$(daemon_pid "$name") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + 30))
  while pid_alive "$pid" "$name"; do
    if ((SECONDS >= deadline)); then
      log "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.1
  done
  log "stopped $name (pid $pid)"
}

# Wait until COMMAND... succeeds, or fail naming LOGFILE. Also fails at once when DAEMON dies.
# usage: wait_until "what" LOGFILE DAEMON|- COMMAND...
wait_until() {
  local what=$1 logfile=$2 daemon=$3
  shift 3
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    if [[ $daemon != - ]] && ! daemon_running "$daemon"; then
      die_with_log "$daemon exited while waiting for: $what" "$logfile"
    fi
    ((SECONDS < deadline)) || die_with_log "timed out after ${TIMEOUT} s waiting for: $what" "$logfile"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- knobs and configuration

# A decimal integer without leading zeros (bash arithmetic would read 010 as octal).
is_uint() { [[ $1 =~ ^(0|[1-9][0-9]{0,8})$ ]]; }

validate_knobs() {
  [[ $ACCOUNTING == 0 || $ACCOUNTING == 1 ]] || die "SLURM_LOCAL_ACCOUNTING must be 0 or 1, got '$ACCOUNTING'"
  is_uint "$GPUS" && ((GPUS <= 64)) || die "SLURM_LOCAL_GPUS must be an integer 0..64, got '$GPUS'"
  is_uint "$CPUS" && ((CPUS >= 1 && CPUS <= 1024)) || die "SLURM_LOCAL_CPUS must be an integer 1..1024, got '$CPUS'"
  is_uint "$MAX_ARRAY_SIZE" && ((MAX_ARRAY_SIZE <= 4000001)) ||
    die "SLURM_LOCAL_MAX_ARRAY_SIZE must be an integer 0..4000001, got '$MAX_ARRAY_SIZE'"
  is_uint "$TIMEOUT" && ((TIMEOUT >= 1)) || die "SLURM_LOCAL_TIMEOUT must be a positive integer, got '$TIMEOUT'"
  [[ $PARTITION =~ ^[A-Za-z][A-Za-z0-9_-]{0,39}$ ]] || die "SLURM_LOCAL_PARTITION must match [A-Za-z][A-Za-z0-9_-]*, got '$PARTITION'"
  # Slurm lowercases cluster names, and they become MariaDB table-name prefixes.
  [[ $CLUSTER =~ ^[a-z][a-z0-9_]{0,39}$ ]] || die "SLURM_LOCAL_CLUSTER must match [a-z][a-z0-9_]*, got '$CLUSTER'"
}

# The node is named after the short hostname but addressed as 127.0.0.1, so nothing depends on DNS.
node_name() { hostname -s; }

# Daemons bind to the address the hostname resolves to (CommunicationParameters=NoInAddrAny), not to
# every interface. That must be a loopback address, or the cluster would listen on the network.
check_hostname_is_loopback() {
  local node addr
  node=$(node_name)
  addr=$(getent ahostsv4 "$node" 2>/dev/null | awk 'NR == 1 { print $1 }' || true)
  [[ $addr == 127.* ]] ||
    die "hostname '$node' resolves to '${addr:-nothing}', not to a loopback address. The Slurm daemons bind to the hostname's address so that they listen on loopback only. Fix: add the line '127.0.1.1 $node' to /etc/hosts, then rerun."
}

render_slurm_conf() {
  local node=$1
  cat <<EOF
# Written by cluster/slurm/slurm-local.sh; rewritten on every 'start' (edit the script, not this file).
ClusterName=$CLUSTER
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# The requeue hold (EligibleTime) equals cred_expire: 120 s by default; 5 is the smallest accepted.
AuthInfo=cred_expire=5
# Bind to the hostname's (loopback) address instead of every interface.
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# submitit ignores SIGTERM, so scancel/requeue wait KillWait before SIGKILL (default 30 s).
KillWait=5
MaxArraySize=$MAX_ARRAY_SIZE
MailProg=/bin/true
ReturnToService=2
# Trust CPUs= below even though the machine has fewer cores (more array tasks at once).
SlurmdParameters=config_overrides
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=${PIDFILE[slurmctld]}
SlurmdPidFile=${PIDFILE[slurmd]}
SlurmctldLogFile=${LOGFILE[slurmctld]}
SlurmdLogFile=${LOGFILE[slurmd]}
EOF
  if [[ $ACCOUNTING == 1 ]]; then
    cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
EOF
  else
    echo "AccountingStorageType=accounting_storage/none"
  fi
  local gres=""
  ((GPUS > 0)) && gres=" Gres=gpu:$GPUS"
  cat <<EOF
JobCompType=jobcomp/none
GresTypes=gpu
NodeName=$node NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEMORY_MB$gres State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

render_gres_conf() {
  local node=$1
  echo "# Written by cluster/slurm/slurm-local.sh. Fake GPUs: one symlink to /dev/null per GPU."
  echo "AutoDetect=off"
  if ((GPUS == 1)); then
    echo "NodeName=$node Name=gpu File=$FAKEGPU/nvidia0"
  elif ((GPUS > 1)); then
    echo "NodeName=$node Name=gpu File=$FAKEGPU/nvidia[0-$((GPUS - 1))]"
  fi
}

render_slurmdbd_conf() {
  cat <<EOF
# Written by cluster/slurm/slurm-local.sh.
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
CommunicationParameters=NoInAddrAny
SlurmUser=root
DebugLevel=info
LogFile=${LOGFILE[slurmdbd]}
PidFile=${PIDFILE[slurmdbd]}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=root
EOF
}

render_mariadb_cnf() {
  cat <<EOF
# Written by cluster/slurm/slurm-local.sh: small footprint, unix socket only (no TCP at all).
[mysqld]
innodb_buffer_pool_size=32M
innodb_lock_wait_timeout=900
skip-networking
EOF
}

# Install CONTENT_FILE at DEST with MODE when it differs; return 0 when DEST was (re)written.
install_if_changed() {
  local src=$1 dest=$2 mode=$3
  if [[ -f $dest ]] && cmp -s "$src" "$dest"; then
    return 1
  fi
  mkdir -p "$(dirname "$dest")"
  install -m "$mode" -o root -g root "$src" "$dest"
  log "wrote $dest"
  return 0
}

# ---------------------------------------------------------------- packages

wanted_packages() {
  printf '%s\n' munge slurm-client slurmctld slurmd
  [[ $ACCOUNTING == 1 ]] && printf '%s\n' slurmdbd mariadb-server
  return 0
}

install_packages() {
  local missing=() p status
  local -a wanted
  mapfile -t wanted < <(wanted_packages)
  for p in "${wanted[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
    [[ $status == installed ]] || missing+=("$p")
  done
  ((${#missing[@]} > 0)) || return 0
  local t0 aptlog=$OWNLOG/apt.log temp_policy=0 manindex=0 rc=0
  t0=$(now)
  log "installing ${missing[*]} (apt output: $aptlog)"
  # Keep maintainer scripts from starting services (this script starts them itself).
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    temp_policy=1
  fi
  # Skip man-db's index rebuild during this install (about 10 s); `man` works without it.
  if [[ -e /var/lib/man-db/auto-update ]]; then
    rm -f /var/lib/man-db/auto-update
    manindex=1
  fi
  {
    DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        -o Dpkg::Options::=--force-unsafe-io "${missing[@]}"
  } >>"$aptlog" 2>&1 || rc=$?
  ((manindex)) && touch /var/lib/man-db/auto-update
  ((temp_policy)) && rm -f /usr/sbin/policy-rc.d
  ((rc == 0)) || die_with_log "apt-get failed (exit $rc) installing ${missing[*]}" "$aptlog"
  log "installed in $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- starting daemons

start_munged() {
  daemon_running munged && return 0
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  install -d -o munge -g munge -m 0755 /run/munge
  (cd / && runuser -u munge -- "${DAEMON_ENV[@]}" /usr/sbin/munged \
    </dev/null >>"$OWNLOG/munged.out" 2>&1 9>&-) ||
    die_with_log "munged failed to start" "${LOGFILE[munged]}"
  wait_until "munged to answer" "${LOGFILE[munged]}" munged sh -c 'munge -n </dev/null | unmunge'
  log "started munged (pid $(daemon_pid munged))"
}

mariadb_ping() { mariadb-admin --no-defaults --socket=/run/mysqld/mysqld.sock -uroot ping; }

start_mariadbd() {
  daemon_running mariadbd && return 0
  install -d -o mysql -g mysql -m 0755 /run/mysqld
  if [[ ! -d /var/lib/mysql/mysql ]]; then
    log "initialising /var/lib/mysql"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >>"${LOGFILE[mariadbd]}" 2>&1 ||
      die_with_log "mariadb-install-db failed" "${LOGFILE[mariadbd]}"
  fi
  rm -f "${PIDFILE[mariadbd]}"
  # mariadbd does not daemonize: run it in its own session, detached from this script.
  (cd / && exec setsid "${DAEMON_ENV[@]}" /usr/sbin/mariadbd --user=mysql \
    --pid-file="${PIDFILE[mariadbd]}" --socket=/run/mysqld/mysqld.sock \
    </dev/null >>"${LOGFILE[mariadbd]}" 2>&1 9>&-) &
  disown $! 2>/dev/null || true
  wait_until "mariadbd to write its pid file" "${LOGFILE[mariadbd]}" - daemon_running mariadbd
  wait_until "mariadbd to answer on /run/mysqld/mysqld.sock" "${LOGFILE[mariadbd]}" mariadbd mariadb_ping
  log "started mariadbd (pid $(daemon_pid mariadbd))"
}

# Start one of the self-daemonizing Slurm daemons.
start_slurm_daemon() {
  local name=$1
  daemon_running "$name" && return 0
  mkdir -p "$SLURMLOG"
  (cd / && "${DAEMON_ENV[@]}" "/usr/sbin/$name" </dev/null >>"${LOGFILE[$name]}" 2>&1 9>&-) ||
    die_with_log "$name failed to start" "${LOGFILE[$name]}"
  wait_until "$name to write its pid file" "${LOGFILE[$name]}" - daemon_running "$name"
  log "started $name (pid $(daemon_pid "$name"))"
}

cluster_registered() {
  local out
  out=$(timeout 10 sacctmgr -n -P show cluster format=Cluster 2>/dev/null) || return 1
  grep -qx "$CLUSTER" <<<"$out"
}

sacct_answers() { timeout 10 sacct -n -X -P -j 1 -o JobID >/dev/null 2>&1; }

# The node's state as scontrol prints it, e.g. IDLE, MIXED, IDLE+DRAIN, DOWN+NOT_RESPONDING, ...
node_state() {
  local out
  out=$(timeout 10 scontrol show node -o "$(node_name)" 2>/dev/null) || return 0
  tr ' ' '\n' <<<"$out" | sed -n 's/^State=//p'
}

# True when jobs can run on the node right now.
node_usable() {
  local s
  s=$(node_state)
  [[ $s =~ ^(IDLE|MIXED|ALLOCATED|COMPLETING) ]] || return 1
  [[ ! $s =~ (DRAIN|DOWN|INVAL|FAIL|NOT_RESPONDING|MAINT|RESERVED) ]]
}

# Wait for the node to be usable. A drained/down/invalid node is resumed: that state persists in
# $CTLD_SPOOL/node_state across restarts (e.g. after a bad gres.conf).
wait_for_node() {
  local deadline=$((SECONDS + TIMEOUT)) s last_resume=-10 node
  node=$(node_name)
  while ! node_usable; do
    for d in slurmctld slurmd; do
      daemon_running "$d" || die_with_log "$d exited while waiting for node $node" "${LOGFILE[$d]}"
    done
    s=$(node_state)
    if [[ $s =~ (DRAIN|INVAL|FAIL) || ($s =~ DOWN && ! $s =~ NOT_RESPONDING) ]] && ((SECONDS - last_resume >= 3)); then
      log "node $node is $s; resuming it"
      timeout 10 scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
      last_resume=$SECONDS
    fi
    ((SECONDS < deadline)) ||
      die_with_log "timed out after ${TIMEOUT} s waiting for node $node to be idle (state: ${s:-unknown}); also read ${LOGFILE[slurmctld]}" "${LOGFILE[slurmd]}"
    sleep 0.2
  done
}

wait_for_accounting() {
  local deadline=$((SECONDS + TIMEOUT)) added=0
  until cluster_registered && sacct_answers; do
    daemon_running slurmdbd || die_with_log "slurmdbd exited while waiting for sacct" "${LOGFILE[slurmdbd]}"
    # slurmctld registers its cluster with slurmdbd by itself; add it if that has not happened soon.
    if ((!added && SECONDS + TIMEOUT - deadline >= 10)) && ! cluster_registered; then
      log "cluster $CLUSTER not registered in slurmdbd after 10 s; adding it with sacctmgr"
      timeout 10 sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
      added=1
    fi
    ((SECONDS < deadline)) ||
      die_with_log "timed out after ${TIMEOUT} s waiting for sacct to answer for cluster $CLUSTER; also read ${LOGFILE[slurmctld]}" "${LOGFILE[slurmdbd]}"
    sleep 0.2
  done
}

cluster_ready() {
  local d
  for d in munged slurmctld slurmd; do daemon_running "$d" || return 1; done
  if [[ $ACCOUNTING == 1 ]]; then
    daemon_running mariadbd && daemon_running slurmdbd || return 1
  fi
  node_usable || return 1
  if [[ $ACCOUNTING == 1 ]]; then
    cluster_registered && sacct_answers || return 1
  fi
}

take_lock() {
  mkdir -p "$STATE"
  exec 9>"$STATE/lock"
  flock -w 600 9 || die "another slurm-local.sh holds $STATE/lock"
}

# ---------------------------------------------------------------- commands

cmd_start() {
  need_root start
  validate_knobs
  local t0 node tmp
  t0=$(now)
  take_lock
  mkdir -p "$OWNLOG"
  install_packages
  check_hostname_is_loopback
  node=$(node_name)

  tmp=$(mktemp -d)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  render_slurm_conf "$node" >"$tmp/slurm.conf"
  render_gres_conf "$node" >"$tmp/gres.conf"
  local slurm_changed=0 dbd_changed=0 mariadb_changed=0
  install_if_changed "$tmp/slurm.conf" "$ETC/slurm.conf" 0644 && slurm_changed=1
  install_if_changed "$tmp/gres.conf" "$ETC/gres.conf" 0644 && slurm_changed=1
  if [[ $ACCOUNTING == 1 ]]; then
    render_slurmdbd_conf >"$tmp/slurmdbd.conf"
    render_mariadb_cnf >"$tmp/mariadb.cnf"
    install_if_changed "$tmp/slurmdbd.conf" "$ETC/slurmdbd.conf" 0600 && dbd_changed=1
    install_if_changed "$tmp/mariadb.cnf" "$MARIADB_CNF" 0644 && mariadb_changed=1
  fi

  # Fake GPU device files: symlinks to /dev/null, outside /dev so no tool takes them for real GPUs.
  mkdir -p "$FAKEGPU"
  local i f
  for ((i = 0; i < GPUS; i++)); do
    [[ -L $FAKEGPU/nvidia$i ]] || ln -sfn /dev/null "$FAKEGPU/nvidia$i"
  done
  for f in "$FAKEGPU"/nvidia*; do
    [[ -e $f || -L $f ]] || continue
    i=${f##*/nvidia}
    [[ $i =~ ^[0-9]+$ ]] && ((i < GPUS)) || rm -f "$f"
  done

  if ((!slurm_changed && !dbd_changed && !mariadb_changed)) && cluster_ready; then
    log "already running ($(elapsed "$t0") s): cluster $CLUSTER, node $node, partition $PARTITION"
    return 0
  fi

  mkdir -p "$CTLD_SPOOL" "$SLURMD_SPOOL" "$SLURMLOG"
  start_munged

  if [[ $ACCOUNTING == 1 ]]; then
    ((mariadb_changed)) && stop_daemon mariadbd
    ((dbd_changed)) && stop_daemon slurmdbd
    start_mariadbd
    start_slurm_daemon slurmdbd
    wait_until "slurmdbd to answer sacctmgr" "${LOGFILE[slurmdbd]}" slurmdbd \
      timeout 10 sacctmgr -n show cluster
  else
    # Accounting switched off: the database daemons are not needed.
    stop_daemon slurmdbd
    stop_daemon mariadbd
  fi

  if ((slurm_changed)); then
    # Only the two daemons that read slurm.conf/gres.conf restart; running jobs survive.
    stop_daemon slurmd
    stop_daemon slurmctld
  fi
  # slurmctld refuses to start when the state directory belongs to another ClusterName.
  if [[ -f $CTLD_SPOOL/clustername ]] && [[ $(cat "$CTLD_SPOOL/clustername") != "$CLUSTER" ]]; then
    log "ClusterName changed to $CLUSTER: forgetting $CTLD_SPOOL/clustername"
    rm -f "$CTLD_SPOOL/clustername"
  fi
  start_slurm_daemon slurmctld
  wait_until "slurmctld to answer 'scontrol ping'" "${LOGFILE[slurmctld]}" slurmctld \
    sh -c 'timeout 10 scontrol ping | grep -q UP'
  start_slurm_daemon slurmd
  wait_for_node
  [[ $ACCOUNTING == 1 ]] && wait_for_accounting
  log "cluster $CLUSTER is up in $(elapsed "$t0") s: node $node ($CPUS CPUs, $GPUS fake GPUs), partition $PARTITION, accounting=$ACCOUNTING, MaxArraySize=$MAX_ARRAY_SIZE"
}

cmd_stop() {
  need_root stop
  local t0 ids deadline
  t0=$(now)
  take_lock
  if daemon_running slurmctld; then
    ids=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
    if [[ -n ${ids// /} ]]; then
      log "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      timeout 10 scancel $ids 2>/dev/null || true
      deadline=$((SECONDS + 20))
      while [[ -n $(timeout 10 squeue -h -o %A 2>/dev/null || true) ]] && ((SECONDS < deadline)); do
        sleep 0.2
      done
    fi
  fi
  # slurmctld before slurmdbd, so it can flush job records; munged last.
  local d
  for d in slurmd slurmctld slurmdbd mariadbd munged; do
    stop_daemon "$d"
  done
  log "stopped in $(elapsed "$t0") s"
}

cmd_status() {
  local d pid usable=1 acct=1 reason=""
  # Accounting is on when the written slurm.conf says so (status reads no knobs).
  if [[ -r $ETC/slurm.conf ]] && grep -q '^AccountingStorageType=accounting_storage/none' "$ETC/slurm.conf"; then
    acct=0
  fi
  for d in "${ALL_DAEMONS[@]}"; do
    if pid=$(daemon_pid "$d"); then
      printf '%-10s running (pid %s)\n' "$d" "$pid"
    else
      printf '%-10s stopped\n' "$d"
      case $d in
        munged | slurmctld | slurmd) usable=0 reason+=" $d stopped;" ;;
        mariadbd | slurmdbd) ((acct)) && usable=0 reason+=" $d stopped (accounting is on);" ;;
      esac
    fi
  done
  if [[ -r $ETC/slurm.conf ]]; then
    grep -E '^(ClusterName|MaxArraySize|AccountingStorageType|NodeName|PartitionName)=' "$ETC/slurm.conf" | sed 's/^/conf: /'
  else
    usable=0 reason+=" no $ETC/slurm.conf;"
  fi
  if command -v sinfo >/dev/null && daemon_running slurmctld; then
    timeout 10 sinfo -N -o '%N %P %T %c %G' 2>&1 || true
    node_usable || { usable=0; reason+=" node $(node_name) is $(node_state || true);"; }
    if ((acct)) && daemon_running slurmdbd; then
      sacct_answers || { usable=0; reason+=" sacct does not answer;"; }
    fi
  fi
  if ((usable)); then
    echo "usable: yes"
    return 0
  fi
  echo "usable: no:${reason%;}"
  return 1
}

case ${1:-} in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 start|stop|status   (knobs: see the top of this file or cluster/slurm/README.md)" >&2
    exit 2
    ;;
esac
