#!/usr/bin/env bash
# The scheduler test: submits the real job scripts in jobs/ to a real Slurm (Debian's slurm-wlm),
# started here as a one-node cluster on 127.0.0.1 with every config, key, state and log file in a
# temporary directory. Run by scripts/test.sh; on its own: `bash tests/scheduler/run.sh` (as root).
#
#   1. PBS:   qsub jobs/train.pbs, then qsub -W depend=afterok:<id> jobs/evaluate.pbs
#             (slurm-wlm-torque's qsub, which turns the #PBS script into an sbatch submission)
#   2. Slurm: sbatch jobs/train.slurm, then sbatch --dependency=afterok:<id> jobs/evaluate.slurm
#   3. SIGTERM: sbatch jobs/train.slurm with --resume, then scancel it after a new epoch: Slurm sends
#      SIGTERM to every process of the job and SIGKILL after KillWait, exactly as at the time
#      limit. The job must end with sac's status 130, the last checkpoint loadable and the log
#      saying how to resume.
#   4. Open MPI: the chains of 1. and 2. and the cancel of 3. with the Open MPI build under Open MPI's
#      launcher (skipped without that build: scripts/build.sh --mpi openmpi).
# For each job: its final state and exit code, the directives it was given (name, tasks,
# time limit), the files it wrote (checkpoint, state.json, output/metrics.json) and its log.
#
# Needs root (slurmd runs jobs as root here) and installs slurm-wlm, munge and slurm-wlm-torque
# with apt-get if they are missing. Everything started is stopped, and the temporary directory
# removed, on every exit path. SAC_SKIP_SCHEDULER=1 skips the test (says so, exits 0);
# SAC_SCHEDULER_LOGS=<dir> keeps a copy of the job and daemon logs there.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 1

say() { printf '\033[1mscheduler-test:\033[0m %s\n' "$*" >&2; }

if [[ ${SAC_SKIP_SCHEDULER:-0} == 1 ]]; then
  say "SKIPPED (SAC_SKIP_SCHEDULER=1)"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# Bookkeeping: each check is a step with a name, PASS/FAIL and its duration; the summary at exit.
t_all=$SECONDS
results=()
failed=0
step_name=""
step_t0=0
step_open=0
begin() {
  step_name="$1"
  step_t0=$SECONDS
  step_open=1
  say "── $step_name"
}
pass() {
  results+=("PASS  $(printf '%4d' $((SECONDS - step_t0))) s  $step_name")
  step_open=0
}
fail() {
  step_open=0
  say "FAIL: $step_name: $*"
  results+=("FAIL  $(printf '%4d' $((SECONDS - step_t0))) s  $step_name: $*")
  failed=1
}
skip() { results+=("SKIP          $1: $2"); }

# ---------------------------------------------------------------------------------------------
# Packages and the binary (outside the temporary directory: nothing to clean up yet).
if [[ $(id -u) != 0 ]]; then
  say "FAIL: needs root: slurmd starts the jobs and SlurmUser=root (set SAC_SKIP_SCHEDULER=1 to skip)"
  exit 1
fi
pkgs=(slurm-wlm munge slurm-wlm-torque)
begin "Debian packages: ${pkgs[*]}"
if ! bash "$root/scripts/apt-ensure.sh" "${pkgs[@]}"; then
  say "FAIL: apt-get could not install ${pkgs[*]} (output above)"
  exit 1
fi
pass
sac="$root/target/release/sac"
if [[ ! -x $sac ]]; then
  say "building target/release/sac"
  cargo build --release --quiet || {
    say "FAIL: cargo build --release"
    exit 1
  }
fi

# Nothing from a surrounding job or site set-up may leak into the submissions.
while IFS='=' read -r name _; do
  [[ $name == SLURM_* || $name == SBATCH_* || $name == SALLOC_* || $name == SRUN_* || $name == PBS_* ]] && unset "$name"
done < <(env)
unset CONFIG SAC_ARGS SAC_BIN

# ---------------------------------------------------------------------------------------------
# The cluster's files, and tear-down on every exit.
tmp="$(mktemp -d /tmp/sac-scheduler.XXXXXX)"
# munged insists that everyone may traverse the directories above its socket.
chmod 755 "$tmp"
mkdir -p "$tmp"/{munge,state,spool,log,jobs,proj}
export SLURM_CONF="$tmp/slurm.conf"
pids=() # munged, slurmctld, slurmd

# Every process that has a file or its working directory in $tmp: slurmstepd (logs there) and
# the jobs' processes (their output goes there). Identified by id, never by name.
holders() {
  local d pid f
  for d in /proc/[0-9]*; do
    pid="${d#/proc/}"
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    for f in "$d/cwd" "$d"/fd/*; do
      if [[ "$(readlink "$f" 2>/dev/null)/" == "$tmp"/* ]]; then
        echo "$pid"
        break
      fi
    done
  done
}

cleanup() {
  local rc=$? i pid alive left
  trap - EXIT INT TERM
  ((step_open)) && fail "did not finish (status $rc)"
  say "── tear-down"
  # Jobs first, while slurmctld is up: scancel, then wait for them to leave the queue.
  if ((${#pids[@]} == 3)) && kill -0 "${pids[1]}" 2>/dev/null; then
    if [[ -n "$(squeue -h -o %i 2>/dev/null)" ]]; then
      squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null
      for ((i = 0; i < 40; i++)); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
        sleep 0.5
      done
    fi
  fi
  # Daemons, in reverse order of start: SIGTERM, up to 10 s, then SIGKILL.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null
  done
  for ((i = 0; i < 20; i++)); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null; done
  wait 2>/dev/null
  # Anything still running from this cluster (a step daemon, a job's rank).
  mapfile -t left < <(holders)
  if ((${#left[@]})); then
    say "stopping leftover processes: ${left[*]}"
    kill -9 "${left[@]}" 2>/dev/null
    sleep 0.5
  fi
  if [[ -n ${SAC_SCHEDULER_LOGS:-} ]]; then
    mkdir -p "$SAC_SCHEDULER_LOGS" && cp -r "$tmp/log" "$tmp/jobs" "$SLURM_CONF" "$SAC_SCHEDULER_LOGS"/ &&
      say "logs copied to $SAC_SCHEDULER_LOGS"
  fi
  rm -rf "$tmp"

  echo >&2
  say "summary ($((SECONDS - t_all)) s in all)"
  local r
  for r in "${results[@]}"; do printf '  %s\n' "$r" >&2; done
  if ((failed)) || ((rc != 0)); then
    say "FAIL"
    exit 1
  fi
  say "PASS"
  exit 0
}
trap cleanup EXIT
trap 'say "interrupted"; failed=1; exit 1' INT TERM

# Print the last lines of the daemons' logs (after a failure).
show_logs() {
  local f
  for f in "$tmp"/log/*; do
    [[ -s $f ]] || continue
    echo "---- ${f#"$tmp"/} (last 15 lines)" >&2
    tail -n 15 "$f" >&2
  done
}

# ---------------------------------------------------------------------------------------------
# Start munged, slurmctld and slurmd.
begin "start munged, slurmctld, slurmd (one node, 127.0.0.1)"
node="$(hostname -s)"
# Two free TCP ports next to each other, away from Slurm's defaults (a real slurmd may be running).
port=""
for ((i = 0; i < 50; i++)); do
  p=$((20000 + RANDOM % 30000))
  if ! ss -Hltn 2>/dev/null | awk '{print $4}' | grep -qE ":($p|$((p + 1)))\$"; then
    port=$p
    break
  fi
done
[[ -n $port ]] || port=16817
# The node declares 4 CPUs although the machine may have 2: the job scripts ask for 4 ranks (the
# evaluation pipeline wants at least 4), MPICH runs 4 ranks on 2 cores (waiting ranks yield the CPU),
# and config_overrides makes slurmd report the configured CPUs instead of draining the node.
cat >"$SLURM_CONF" <<EOF
# Generated by tests/scheduler/run.sh: a one-node cluster on the loopback interface.
ClusterName=sactest
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$tmp/munge/munge.sock
CredType=cred/munge
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/log/slurmctld.log
SlurmdLogFile=$tmp/log/slurmd.log
# No cgroups: plain process tracking, no task binding, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$tmp/log/jobcomp.txt
MailProg=/bin/true
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay visible to scontrol for 10 minutes (there is no accounting database).
MinJobAge=600
# SIGTERM, then SIGKILL this much later (Slurm's default is 30 s).
KillWait=15
# An evaluation whose training failed is cancelled instead of waiting forever.
DependencyParameters=kill_invalid_depend
NodeName=$node NodeAddr=127.0.0.1 CPUs=4 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$tmp/cgroup.conf" <<'EOF'
# Present so that nothing falls back to /etc/slurm/cgroup.conf; the plugins in slurm.conf
# (proctrack/linuxproc, task/none, jobacct_gather/none) use no cgroups, which a container may lack.
EOF
start_ok=1
mungekey --create --keyfile="$tmp/munge/munge.key" 2>"$tmp/log/mungekey.out" ||
  dd if=/dev/urandom of="$tmp/munge/munge.key" bs=1024 count=1 2>/dev/null
chmod 600 "$tmp/munge/munge.key"
munged --foreground --socket="$tmp/munge/munge.sock" --key-file="$tmp/munge/munge.key" \
  --pid-file="$tmp/munge/munged.pid" --seed-file="$tmp/munge/munged.seed" \
  --log-file="$tmp/log/munged.log" >"$tmp/log/munged.out" 2>&1 &
pids+=($!)
for ((i = 0; i < 40; i++)); do
  [[ -S $tmp/munge/munge.sock ]] && break
  sleep 0.25
done
if ! munge -n --socket="$tmp/munge/munge.sock" 2>/dev/null | unmunge --socket="$tmp/munge/munge.sock" >/dev/null 2>&1; then
  start_ok=0
  fail "munged does not answer on $tmp/munge/munge.sock"
fi
if ((start_ok)); then
  slurmctld -D -f "$SLURM_CONF" >"$tmp/log/slurmctld.out" 2>&1 &
  pids+=($!)
  slurmd -D -N "$node" -f "$SLURM_CONF" >"$tmp/log/slurmd.out" 2>&1 &
  pids+=($!)
  state=""
  for ((i = 0; i < 120; i++)); do # 60 s
    state="$(sinfo -h -N -n "$node" -o %T 2>/dev/null)"
    [[ $state == idle ]] && break
    sleep 0.5
  done
  if [[ $state == idle ]]; then
    pass
    say "cluster up in $((SECONDS - step_t0)) s: node $node idle, slurmctld on 127.0.0.1:$port"
  else
    start_ok=0
    fail "node $node not idle after 60 s (state '${state}')"
  fi
fi
if ((!start_ok)); then
  show_logs
  exit 1
fi

# ---------------------------------------------------------------------------------------------
# The fixture: 200 Fashion-MNIST images at 32x32, one config per chain (shared data dir).
begin "fixture: sac create-dataset --sample 200"
proj="$tmp/proj"
for chain in pbs slurm openmpi pbs-openmpi; do
  cat >"$proj/$chain.toml" <<EOF
[paths]
data_dir = "data"
checkpoint_dir = "checkpoints-$chain"
output_dir = "output-$chain"
log_file = "$chain.log"
[dataset]
source = "/usr/share/datasets/fashion-mnist"
sample = 200
[image]
width = 32
height = 32
[train]
epochs = 2           # the jobs pass SAC_ARGS to train 1: proof that SAC_ARGS reaches sac
batch_size = 8
threads = 1
validate = true
[evaluate]
batch_size = 8
EOF
done
if "$sac" -q --config "$proj/pbs.toml" create-dataset >"$tmp/log/create-dataset.out" 2>&1; then
  pass
else
  fail "create-dataset failed"
  cat "$tmp/log/create-dataset.out" >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------
# Helpers for jobs.

# job_field <id> <Field>: one field of `scontrol show job` (kept for MinJobAge after the end).
job_field() { scontrol -o show job "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }

# wait_jobs <seconds> <id>...: until none of the jobs is pending or running (status 0); 1 after
# <seconds>, 2 at once if a daemon has died.
wait_jobs() {
  local limit=$1 t0=$SECONDS id st busy pid
  shift
  while ((SECONDS - t0 < limit)); do
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || {
        say "a daemon (pid $pid) has died"
        return 2
      }
    done
    busy=0
    for id in "$@"; do
      st="$(job_field "$id" JobState)"
      case "$st" in PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | REQUEUED | RESIZING | "") busy=1 ;; esac
    done
    ((busy)) || return 0
    sleep 1
  done
  return 1
}

# expect_job <id> <log> <state> <exit code> <name>: the job's end, as scontrol reports it.
expect_job() {
  local id=$1 log=$2 want_state=$3 want_exit=$4 want_name=$5 st ex nm
  st="$(job_field "$id" JobState)"
  ex="$(job_field "$id" ExitCode)"
  nm="$(job_field "$id" JobName)"
  if [[ $st != "$want_state" || $ex != "$want_exit" || $nm != "$want_name" ]]; then
    echo "job $id ($nm): JobState=$st ExitCode=$ex, expected $want_name JobState=$want_state ExitCode=$want_exit"
    return 1
  fi
  [[ -s $log ]] || {
    echo "job $id wrote no log $log"
    return 1
  }
}

# check_json <file> <python expression over d>: a JSON file exists and the expression holds.
check_json() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
path, expr = sys.argv[1], sys.argv[2]
try:
    d = json.load(open(path))
except Exception as e:
    sys.exit(f"{path}: {e}")
if not eval(expr, {"d": d}):
    sys.exit(f"{path}: {expr} does not hold")
EOF
}

# check_outputs <chain>: what train and evaluate must have written.
check_outputs() {
  local chain=$1 ck="$proj/checkpoints-$1/resnet18" out="$proj/output-$1" f
  for f in "$ck/model.safetensors" "$ck/state.json" "$out/metrics.json" "$out/predictions.csv"; do
    [[ -s $f ]] || {
      echo "missing $f"
      return 1
    }
  done
  check_json "$ck/state.json" 'd["epoch"] == 1 and d["world_size"] == 4' || return 1
  check_json "$out/metrics.json" 'd["images"] == 40 and all(k in d for k in ("top1", "top5", "macro_f1", "images_per_second"))' || return 1
}

# run_chain <chain> <train id> <eval id> <train log> <eval log> <train name> <eval name>
run_chain() {
  local chain=$1 tid=$2 eid=$3 tlog=$4 elog=$5 tname=$6 ename=$7 msg dep spec id log name
  dep="$(job_field "$eid" Dependency)"
  if [[ $dep != afterok:"$tid"* ]]; then
    fail "evaluation job $eid does not depend on $tid (Dependency=$dep)"
    return 1
  fi
  say "jobs $tid (train) and $eid (evaluate, Dependency=$dep) submitted; waiting (at most 180 s)"
  if ! wait_jobs 180 "$tid" "$eid"; then
    fail "jobs $tid/$eid not finished after $((SECONDS - step_t0)) s"
    squeue >&2
    tail -n 20 "$tlog" "$elog" >&2 2>/dev/null
    scancel "$tid" "$eid" # so that the next jobs get the node
    return 1
  fi
  for spec in "$tid $tlog $tname" "$eid $elog $ename"; do
    read -r id log name <<<"$spec"
    if ! msg="$(expect_job "$id" "$log" COMPLETED 0:0 "$name")"; then
      fail "$msg"
      echo "---- job log $log" >&2
      tail -n 40 "$log" >&2 2>/dev/null
      return 1
    fi
  done
  if ! msg="$(check_outputs "$chain" 2>&1)"; then
    fail "$msg"
    return 1
  fi
  if ! grep -q 'sac-job: sac train exited with status 0' "$tlog" ||
    ! grep -q 'sac-job: sac evaluate exited with status 0' "$elog"; then
    fail "the job logs lack sac-job's exit lines"
    return 1
  fi
  pass
}

# ---------------------------------------------------------------------------------------------
# 1. PBS scripts through slurm-wlm-torque's qsub. The wrapper passes -v as sbatch --export=none,…
# (plus the user's login environment), ignores the scripts' `#PBS -j oe` in favour of its own -e
# unless -j is on the command line, and builds an sbatch command line for a shell, so a -v value
# must be one word: SAC_ARGS=-e1 here. -j oe -o keeps the job logs out of the checkout. Its
# `-W depend=afterok:<id>` becomes sbatch --dependency=afterok:<id>.
begin "PBS: qsub jobs/train.pbs; qsub -W depend=afterok:<id> jobs/evaluate.pbs"
tlog="$tmp/jobs/train-pbs.log"
elog="$tmp/jobs/evaluate-pbs.log"
tid="$(qsub -j oe -o "$tlog" -v "CONFIG=$proj/pbs.toml,SAC_ARGS=-e1" jobs/train.pbs 2>&1)"
if [[ $tid =~ ^[0-9]+$ ]]; then
  eid="$(qsub -j oe -o "$elog" -W depend=afterok:"$tid" -v "CONFIG=$proj/pbs.toml" jobs/evaluate.pbs 2>&1)"
  if [[ $eid =~ ^[0-9]+$ ]]; then
    # The #PBS directives reached Slurm: -l nodes=1:ppn=4 → 4 tasks, -l walltime → time limit.
    tasks="$(job_field "$tid" NumTasks)"
    limit="$(job_field "$tid" TimeLimit)"
    if [[ $tasks != 4 || $limit != 02:00:00 ]]; then
      fail "train.pbs's #PBS directives not applied: NumTasks=$tasks TimeLimit=$limit (want 4, 02:00:00)"
    else
      run_chain pbs "$tid" "$eid" "$tlog" "$elog" sac-train sac-evaluate
    fi
  else
    fail "qsub evaluate.pbs: $eid"
  fi
else
  fail "qsub train.pbs: $tid"
fi

# ---------------------------------------------------------------------------------------------
# 2. Slurm scripts with sbatch (here SAC_ARGS may hold several words).
begin "Slurm: sbatch jobs/train.slurm; sbatch --dependency=afterok:<id> jobs/evaluate.slurm"
slurm_ok=0
tlog="$tmp/jobs/train-slurm.log"
elog="$tmp/jobs/evaluate-slurm.log"
tid="$(sbatch --parsable -o "$tlog" --export="ALL,CONFIG=$proj/slurm.toml,SAC_ARGS=--epochs 1" jobs/train.slurm 2>&1)"
if [[ $tid =~ ^[0-9]+$ ]]; then
  eid="$(sbatch --parsable -o "$elog" --dependency=afterok:"$tid" --export="ALL,CONFIG=$proj/slurm.toml" jobs/evaluate.slurm 2>&1)"
  if [[ $eid =~ ^[0-9]+$ ]]; then
    tasks="$(job_field "$tid" NumTasks)"
    limit="$(job_field "$tid" TimeLimit)"
    if [[ $tasks != 4 || $limit != 02:00:00 ]]; then
      fail "train.slurm's #SBATCH directives not applied: NumTasks=$tasks TimeLimit=$limit (want 4, 02:00:00)"
    elif run_chain slurm "$tid" "$eid" "$tlog" "$elog" sac-train sac-evaluate; then
      slurm_ok=1
    fi
  else
    fail "sbatch evaluate.slurm: $eid"
  fi
else
  fail "sbatch train.slurm: $tid"
fi

# ---------------------------------------------------------------------------------------------
# 3. SIGTERM as at the time limit: resume the Slurm chain's checkpoint towards many epochs, let it
# write one more, then scancel (SIGCONT + SIGTERM to every process of the job, SIGKILL after
# KillWait — the sequence slurmd also sends at the time limit).
# term_job NAME LOG EXPORTS SACLOG MPI: sbatch jobs/train.slurm --resume (EXPORTS: more NAME=VALUE,
# comma-led; SACLOG: sac's own log file, fresh for this job), scancel it once it has checkpointed a
# new epoch, and check the clean stop, and that sac's log names the MPI library MPI and its transport.
term_job() {
  local name=$1 tlog=$2 exports=$3 saclog=$4 want_mpi=$5 ck="$proj/checkpoints-slurm/resnet18"
  local resume_line tid epoch start t0 waited msg
  begin "$name"
  resume_line='continue with `sac train --resume`'
  start="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["epoch"])' "$ck/state.json" 2>/dev/null || echo 0)"
  rm -f "$saclog"
  tid="$(sbatch --parsable -o "$tlog" --export="ALL,CONFIG=$proj/slurm.toml,SAC_ARGS=--resume --epochs 1000 --set paths.log_file=$saclog$exports" jobs/train.slurm 2>&1)"
  if [[ ! $tid =~ ^[0-9]+$ ]]; then
    fail "sbatch train.slurm: $tid"
    return
  fi
  epoch=0
  t0=$SECONDS
  while ((SECONDS - t0 < 120)); do
    epoch="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["epoch"])' "$ck/state.json" 2>/dev/null || echo 0)"
    ((epoch >= start + 1)) && break
    case "$(job_field "$tid" JobState)" in PENDING | RUNNING | CONFIGURING) ;; *) break ;; esac
    sleep 0.5
  done
  if ((epoch < start + 1)); then
    fail "no checkpoint of epoch $((start + 1)) within 120 s (job state $(job_field "$tid" JobState))"
    tail -n 30 "$tlog" >&2 2>/dev/null
    scancel "$tid"
    return
  fi
  say "epoch $epoch checkpointed; scancel $tid"
  scancel "$tid"
  t0=$SECONDS
  wait_jobs 45 "$tid" # KillWait (15 s) and a margin
  waited=$?
  say "job $tid: $(job_field "$tid" JobState), exit code $(job_field "$tid" ExitCode), $((SECONDS - t0)) s after scancel"
  if ((waited)); then
    fail "job $tid not finished $((SECONDS - t0)) s after scancel"
  elif ! msg="$(expect_job "$tid" "$tlog" CANCELLED 130:0 sac-train)"; then
    fail "$msg (sac exits 130 after a clean stop; sac-job.sh passes it on)"
    tail -n 30 "$tlog" >&2
  elif ! grep -q "resuming after epoch $start" "$tlog"; then
    fail "the job log does not show --resume from epoch $start"
    tail -n 30 "$tlog" >&2
  # (Open MPI's launcher, signalled itself, no longer forwards the ranks' output: sac's log file
  # has the line then.)
  elif ! grep -qF "$resume_line" "$tlog" "$saclog"; then
    fail "neither the job log nor sac's log has sac's line on how to resume"
    tail -n 30 "$tlog" >&2
  elif ! grep -q 'sac-job: continue it by resubmitting with --resume' "$tlog"; then
    fail "the job log lacks sac-job's resubmission hint"
    tail -n 30 "$tlog" >&2
  elif ! msg="$(check_json "$ck/state.json" "d[\"epoch\"] >= $((start + 1))" 2>&1)"; then
    fail "$msg"
  elif ! grep -q "MPI: $want_mpi.*; transport: \(pml\|device\) [a-z]" "$saclog"; then
    fail "sac's log $saclog does not name $want_mpi and its transport"
  # The checkpoint left behind is complete: sac evaluates it (one process, no scheduler).
  elif ! "$sac" -q --config "$proj/slurm.toml" --set paths.output_dir=output-term evaluate >"$tmp/log/evaluate-term.out" 2>&1; then
    fail "sac evaluate cannot use the checkpoint left after SIGTERM"
    tail -n 20 "$tmp/log/evaluate-term.out" >&2
  else
    pass
  fi
}

# The chains again with the Open MPI build under Open MPI's launcher, which takes the allocation
# from Slurm's environment.
ompi_sac="$root/target/openmpi/release/sac"
ompi_exports="SAC_BIN=$ompi_sac,SAC_MPIEXEC=mpiexec.openmpi --allow-run-as-root --oversubscribe"
ompi_missing=""
[[ -x $ompi_sac ]] && command -v mpiexec.openmpi >/dev/null ||
  ompi_missing="no Open MPI build ($ompi_sac: scripts/build.sh --mpi openmpi) or no mpiexec.openmpi"
# openmpi_chain CHAIN TID EID TLOG ELOG: run_chain of the submitted jobs, then sac's log
# (<CHAIN>.log) must name Open MPI.
openmpi_chain() {
  local chain=$1 tid=$2 eid=$3
  if [[ ! $tid =~ ^[0-9]+$ || ! $eid =~ ^[0-9]+$ ]]; then
    fail "submitting the $chain jobs: $tid $eid"
  elif run_chain "$chain" "$tid" "$eid" "$4" "$5" sac-train sac-evaluate &&
    ! grep -q 'MPI: Open MPI' "$proj/$chain.log"; then
    fail "sac's log $proj/$chain.log does not name Open MPI"
  fi
}

name="Open MPI: sbatch jobs/train.slurm; sbatch --dependency=afterok:<id> jobs/evaluate.slurm"
if [[ -n $ompi_missing ]]; then
  skip "$name" "$ompi_missing"
else
  begin "$name"
  tlog="$tmp/jobs/train-openmpi.log"
  elog="$tmp/jobs/evaluate-openmpi.log"
  tid="$(sbatch --parsable -o "$tlog" --export="ALL,CONFIG=$proj/openmpi.toml,SAC_ARGS=--epochs 1,$ompi_exports" jobs/train.slurm 2>&1)"
  eid="$(sbatch --parsable -o "$elog" --dependency=afterok:"$tid" --export="ALL,CONFIG=$proj/openmpi.toml,$ompi_exports" jobs/evaluate.slurm 2>&1)"
  openmpi_chain openmpi "$tid" "$eid" "$tlog" "$elog"
fi

# And the PBS chain. Slurm's qsub wrapper passes no spaces in -v values: Open MPI's permission to
# run as root comes in its environment variables instead of --allow-run-as-root (the allocation's
# 4 slots need no --oversubscribe).
name="Open MPI: qsub jobs/train.pbs; qsub -W depend=afterok:<id> jobs/evaluate.pbs"
if [[ -n $ompi_missing ]]; then
  skip "$name" "$ompi_missing"
else
  begin "$name"
  tlog="$tmp/jobs/train-pbs-openmpi.log"
  elog="$tmp/jobs/evaluate-pbs-openmpi.log"
  pbs_env="SAC_BIN=$ompi_sac,SAC_MPIEXEC=mpiexec.openmpi,OMPI_ALLOW_RUN_AS_ROOT=1,OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"
  tid="$(qsub -j oe -o "$tlog" -v "CONFIG=$proj/pbs-openmpi.toml,SAC_ARGS=-e1,$pbs_env" jobs/train.pbs 2>&1)"
  eid="$(qsub -j oe -o "$elog" -W depend=afterok:"$tid" -v "CONFIG=$proj/pbs-openmpi.toml,$pbs_env" jobs/evaluate.pbs 2>&1)"
  openmpi_chain pbs-openmpi "$tid" "$eid" "$tlog" "$elog"
fi

name="SIGTERM: scancel a training job (--resume) after a new epoch"
if ((!slurm_ok)); then
  skip "$name" "needs the Slurm chain's checkpoint"
else
  term_job "$name" "$tmp/jobs/train-term.log" "" "$proj/term.log" MPICH
fi

# The same under Open MPI: the Open MPI build (scripts/build.sh --mpi openmpi) through Open MPI's
# launcher, which Slurm's allocation tells where to start the ranks. Slurm signals every process of
# the job; sac-job.sh passes the stop on to mpirun as SIGUSR1 (mpirun answers SIGTERM by killing).
name="Open MPI: the same scancel of a training job with target/openmpi/release/sac"
if ((!slurm_ok)); then
  skip "$name" "needs the Slurm chain's checkpoint"
elif [[ -n $ompi_missing ]]; then
  skip "$name" "$ompi_missing"
else
  term_job "$name" "$tmp/jobs/train-term-openmpi.log" \
    ",$ompi_exports" \
    "$proj/term-openmpi.log" "Open MPI"
fi

((failed)) && show_logs
exit "$failed"
