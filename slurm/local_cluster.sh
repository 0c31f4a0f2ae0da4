#!/usr/bin/env bash
# Install, configure, start, stop and report on a real two-node Slurm cluster
# on localhost (node1 + node2, partitions debug/high, accounting via slurmdbd).
# Used by stillroom's test suite and by users trying the tool without a cluster.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # daemons live in sbin; plain `su` drops it

STATE="${STILLROOM_SLURM_STATE:-/var/lib/stillroom-slurm}"
RUN="$STATE/run" LOG="$STATE/log"
MARKER="# managed by stillroom slurm/local_cluster.sh"
CLUSTER=stillroom NODES=(node1 node2)
DB_NAME=stillroom_slurm_acct DB_USER=stillroom_slurm DB_PASS=stillroom-local-only
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
HOST="$(hostname -s)"
SLURM_CONF=/etc/slurm/slurm.conf DBD_CONF=/etc/slurm/slurmdbd.conf

log() { echo "[local-cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
need_root() {
  ((EUID == 0)) && return 0
  echo "local Slurm cluster needs root to install/start daemons: run 'sudo $0 $1'" >&2
  exit 3
}

usage() {
  cat <<EOF
Usage: $0 {start|stop|status|--help}
  start   install Slurm/munge/MariaDB if missing (apt, needs root), write
          /etc/slurm/{slurm,slurmdbd}.conf, start the daemons and wait until
          node1,node2 are idle and sacct answers. Idempotent.
  stop    cancel all jobs, then stop only the daemons this script started
          (found via its pid files).
  status  print each daemon's state and sinfo; exit 0 if the cluster is up.
State, logs and pid files live in \$STILLROOM_SLURM_STATE (now: $STATE).
EOF
}

# munged runs as user munge, so its pid file lives in a munge-owned dir.
pidfile() { if [[ $1 == munged ]]; then echo "$STATE/munge/munged.pid"; else echo "$RUN/$1.pid"; fi; }

# pid_of NAME: print the pid from our pid file if that process is alive and
# really is NAME (guards against stale files and recycled pids). Zombies count
# as dead: PID 1 in this container reaps orphans only every ~2s.
pid_of() {
  local f pid st
  f="$(pidfile "$1")"
  pid="$(tr -dc 0-9 2>/dev/null <"$f")" || return 1
  [[ -n $pid && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "${1%%-*}" ]] || return 1
  st="$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" || return 1
  [[ $st != Z ]] && echo "$pid"
}

daemons() { echo mariadbd munged slurmdbd slurmctld; printf 'slurmd-%s\n' "${NODES[@]}"; }

mysql_up() { mysqladmin --protocol=socket ping >/dev/null 2>&1; }
munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
sacct_ok() { sacct -n -X -S now-1hours -o jobid >/dev/null 2>&1; }

# fail NAME MESSAGE: report, show the tail of NAME's log and exit 1.
fail() {
  log "ERROR: $2; last lines of $LOG/$1.log:"
  tail -n 25 "$LOG/$1.log" >&2 2>/dev/null || true
  exit 1
}

# launch NAME CMD...: start a self-daemonizing daemon, logging early errors.
launch() {
  local name=$1
  shift
  rm -f "$(pidfile "$name")"
  "$@" </dev/null >>"$LOG/$name.log" 2>&1 9>&- || fail "$name" "$name failed to start"
}

# wait_for SECONDS NAME CMD...: poll CMD; fail early if NAME's pid file names a
# dead process, else after SECONDS.
wait_for() {
  local secs=$1 name=$2 i
  shift 2
  for ((i = 0; i < secs * 5; i++)); do
    "$@" && return 0
    if [[ -e "$(pidfile "$name")" ]] && ! pid_of "$name" >/dev/null; then
      fail "$name" "$name exited"
    fi
    sleep 0.2
  done
  fail "$name" "timed out after ${secs}s waiting for: $*"
}

# True when every daemon is up: ours by pid file, or an external mariadb/munged.
cluster_up() {
  local d
  for d in $(daemons); do
    case $d in
      mariadbd) pid_of "$d" >/dev/null || mysql_up || return 1 ;;
      munged) pid_of "$d" >/dev/null || munge_up || return 1 ;;
      *) pid_of "$d" >/dev/null || return 1 ;;
    esac
  done
  sinfo -h >/dev/null 2>&1
}

ensure_packages() {
  local missing=0 b
  for b in slurmctld slurmd sinfo sacct munged slurmdbd mariadbd; do command -v "$b" >/dev/null || missing=1; done
  ((missing)) || return 0
  log "installing ${PKGS[*]} (one-time, takes a few minutes)"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PKGS[@]}"
}

# write_ours FILE MODE: write stdin to FILE, refusing to clobber a foreign one.
write_ours() {
  if [[ -e $1 ]] && [[ "$(head -n 1 "$1")" != "$MARKER" ]]; then
    die "$1 exists and was not written by this script; move it away or use a real cluster"
  fi
  { echo "$MARKER"; cat; } >"$1.tmp"
  chmod "$2" "$1.tmp"
  mv -f "$1.tmp" "$1"
}

write_configs() {
  local n port=6820
  mkdir -p /etc/slurm
  {
    cat <<EOF
ClusterName=$CLUSTER
# slurmctld refuses to start unless SlurmctldHost names this host.
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=6817
# Bind to 127.0.0.1 only, never 0.0.0.0 (this is a throwaway test cluster).
CommunicationParameters=NoInAddrAny
SlurmUser=root
AuthType=auth/munge
# Short credential lifetime so restarted jobs/steps are not refused for long.
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
# Containers have no usable cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
# CR_CPU: CPUs are the only consumable, so two jobs can share a node's 4 CPUs
# and --mem=1G is accepted (checked against RealMemory, not reserved).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Fast scheduling and cleanup so tests do not wait on Slurm's defaults.
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=5
KillWait=5
SlurmdTimeout=60
ReturnToService=2
MailProg=/bin/true
JobRequeue=1
# Without slurmdbd accounting, sacct fails and submitit reports UNKNOWN states.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
JobCompType=jobcomp/none
# Preemption: a job on 'high' requeues jobs on 'debug'. (PreemptParameters=
# is a fatal parse error in 22.05; the user signal flag lives here instead.)
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
# The host has fewer cores than we declare; config_overrides trusts slurm.conf.
SlurmdParameters=config_overrides
EOF
    # Multiple slurmd on one host: same NodeHostname, distinct ports.
    for n in "${NODES[@]}"; do
      echo "NodeName=$n NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$port CPUs=4 RealMemory=8000 State=UNKNOWN"
      port=$((port + 1))
    done
    local nodes; nodes="$(IFS=,; echo "${NODES[*]}")"
    echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=5"
    echo "PartitionName=high Nodes=$nodes MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
  } | write_ours "$SLURM_CONF" 644
  # slurmdbd insists on mode 600 and ownership by SlurmUser.
  write_ours "$DBD_CONF" 600 <<EOF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
}

prepare_host() {
  local n
  mkdir -p "$RUN" "$LOG" "$STATE/ctld" "$STATE/munge"
  for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n"; done
  # No systemd/tmpfiles here, so the runtime dirs must be created by hand.
  install -d -o mysql -g mysql /run/mysqld
  install -d -o munge -g munge -m 755 /run/munge
  chown munge:munge "$STATE/munge" && chmod 755 "$STATE/munge"
  # munged refuses a log file it does not own.
  touch "$LOG/munged.log" && chown munge:munge "$LOG/munged.log" && chmod 640 "$LOG/munged.log"
  # Jobs use the first node name as torch.distributed master address.
  if ! grep -q 'stillroom local slurm' /etc/hosts; then
    echo "127.0.0.1 ${NODES[*]} # stillroom local slurm" >>/etc/hosts
  fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
}

start_mariadb() {
  pid_of mariadbd >/dev/null && return 0
  if mysql_up; then log "using the MariaDB server already running (not ours, will not stop it)"; else
    [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >>"$LOG/mariadbd.log" 2>&1
    # mariadbd does not daemonize: detach it and record its pid ourselves.
    setsid mariadbd --user=mysql </dev/null >>"$LOG/mariadbd.log" 2>&1 9>&- &
    echo $! >"$RUN/mariadbd.pid"
    wait_for 60 mariadbd mysql_up
  fi
  mysql --protocol=socket -u root <<EOF || die "cannot create MariaDB user $DB_USER (need root socket access)"
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON \`$DB_NAME\`.* TO '$DB_USER'@'localhost';
EOF
}

start_munge() {
  pid_of munged >/dev/null && return 0
  if munge_up; then log "using the munged already running (not ours, will not stop it)"; return 0; fi
  launch munged setpriv --reuid=munge --regid=munge --init-groups \
    munged --pid-file="$(pidfile munged)" --log-file="$LOG/munged.log"
  wait_for 10 munged munge_up
}

start_slurm() {
  local n
  pid_of slurmdbd >/dev/null || launch slurmdbd slurmdbd
  wait_for 60 slurmdbd port_open 6819
  # Register the cluster before slurmctld connects (also creates root's association).
  if ! sacctmgr -n -P show cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  pid_of slurmctld >/dev/null || launch slurmctld slurmctld
  wait_for 30 slurmctld port_open 6817
  for n in "${NODES[@]}"; do
    pid_of "slurmd-$n" >/dev/null || launch "slurmd-$n" slurmd -N "$n"
  done
}

# Nodes kept DOWN/DRAIN in saved state must be resumed; ready = idle/mix/alloc.
nodes_ready() {
  local states
  states="$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null)" || return 1
  if grep -Eq ' (down|drain|drng|fail)$' <<<"$states"; then
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume >/dev/null 2>&1 || true
  fi
  [[ "$(grep -Ec ' (idle|mix|alloc)$' <<<"$states")" -eq ${#NODES[@]} ]]
}

cmd_start() {
  local t0=$SECONDS
  if cluster_up && sacct_ok; then log "already running"; return 0; fi
  need_root start
  # Serialize concurrent starts (e.g. parallel test workers), then re-check;
  # daemons are launched with fd 9 closed so they do not inherit the lock.
  mkdir -p "$STATE" && exec 9>"$STATE/lock" && flock 9
  if cluster_up && sacct_ok; then log "already running"; return 0; fi
  ensure_packages
  prepare_host
  write_configs
  start_mariadb
  start_munge
  start_slurm
  wait_for 60 slurmctld nodes_ready
  wait_for 30 slurmdbd sacct_ok
  echo "[local-cluster] up in $((SECONDS - t0))s: cluster=$CLUSTER nodes=${NODES[*]} (4 CPUs each)" \
    "partitions=debug(default),high conf=$SLURM_CONF state+logs=$STATE"
}

# stop_one NAME: SIGTERM our daemon and wait (slurmctld saves state on TERM,
# so give it time before resorting to SIGKILL).
stop_one() {
  local pid i
  pid="$(pid_of "$1")" || return 0
  log "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 300; i++)); do
    pid_of "$1" >/dev/null || { rm -f "$(pidfile "$1")"; return 0; }
    sleep 0.2
  done
  log "$1 (pid $pid) ignored SIGTERM for 60s, sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
}

# Jobs' slurmstepd processes outlive slurmd, so end all jobs through Slurm
# first: after stop nothing is left running and the next start begins empty.
cancel_jobs() {
  local ids i
  pid_of slurmctld >/dev/null || return 0
  ids="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
  [[ -n ${ids// /} ]] || return 0
  log "cancelling jobs: $ids"
  # shellcheck disable=SC2086  # one word per job id
  scancel $ids || true
  for ((i = 0; i < 150; i++)); do
    [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && return 0
    sleep 0.2
  done
  log "some jobs still completing after 30s; stopping anyway"
}

cmd_stop() {
  local n d
  for d in $(daemons); do pid_of "$d" >/dev/null && need_root stop; done
  cancel_jobs
  stop_one slurmctld
  for n in "${NODES[@]}"; do stop_one "slurmd-$n"; done
  stop_one slurmdbd
  stop_one munged
  stop_one mariadbd
  log "stopped"
}

cmd_status() {
  local d pid
  for d in $(daemons); do
    if pid="$(pid_of "$d")"; then echo "$d: running (pid $pid)"
    elif [[ $d == mariadbd ]] && mysql_up; then echo "$d: running (external)"
    elif [[ $d == munged ]] && munge_up; then echo "$d: running (external)"
    else echo "$d: stopped"; fi
  done
  sinfo 2>&1 || true
  cluster_up
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  -h | --help | help) usage ;;
  *) usage >&2; exit 2 ;;
esac
