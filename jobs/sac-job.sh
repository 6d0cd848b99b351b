#!/usr/bin/env bash
# The body shared by jobs/{train,evaluate}.{pbs,slurm}; they `cd` to the submit directory (the sac
# checkout) and `exec bash jobs/sac-job.sh train|evaluate`. You do not submit this file itself.
#
# Environment (set with `qsub -v CONFIG=…,SAC_ARGS=…` or `sbatch --export=ALL,CONFIG=…,SAC_ARGS=…`):
#   CONFIG    the config file (default config.toml; relative to the submit directory)
#   SAC_ARGS  extra flags for `sac train` / `sac evaluate`, e.g. --resume (default: none)
#   SAC_BIN   the sac binary (default $PWD/target/release/sac: `cargo build --release` builds it)
#   SAC_STALL_ABORT  seconds after which a rank that stops answering (a hung node, a stopped
#             process) ends the job instead of holding the allocation until the walltime
#             (train.stall_abort; default 900; 0: never). A --set in SAC_ARGS wins over it.
#   SAC_RESTARTS  how often a failed training restarts itself with --resume (default 2; 0: never).
#             See "Restarts" below.
#   SAC_MPIEXEC  the launcher and its flags (default mpiexec; e.g. "mpiexec.openmpi --map-by core"
#             for a build against Open MPI where mpiexec is another MPI's)
# Rank count: PBS_NP, else the lines of PBS_NODEFILE (Torque/PBS), else SLURM_NTASKS (Slurm, and
# Slurm's qsub wrapper, which sets no PBS_* variables), else 1.
#
# Signals: at the walltime (and on qdel/scancel) the scheduler sends SIGTERM; sac then stops every
# rank at a step boundary with the last complete checkpoint intact, and exits 130. mpiexec runs in
# the background so that this shell, which receives the signal too, passes it on and then waits for
# sac to finish instead of exiting first (`qsig` on PBS and `scancel -b` on Slurm signal only this
# shell). The scheduler's SIGKILL follows after a grace period (Slurm KillWait, 30 s by default;
# PBS kill_delay, often a few seconds): a training step must end within it for the clean stop. A
# rank that waits for peers which do not come ends the job itself 20 s after the signal. SIGUSR1 to
# this shell (`sbatch --signal=B:USR1@300`: five minutes before the time limit) stops it the same way.
#
# Restarts: a training that fails after it began (a rank died, panicked, ran out of memory or
# stalled past stall_abort; a non-finite loss under nonfinite = "fail") starts again in the same
# allocation with --resume from its last complete epoch, up to SAC_RESTARTS times. Not restarted:
# a configuration or data error (sac exits 2 before the first step: a restart fails the same way),
# a stop on a signal (exit 130: the walltime or qdel/scancel; resubmit, or let the scheduler
# requeue), and an attempt that saved no new epoch (it would only fail again at the same place).
# Each restart is logged with its cause and the epoch it resumes from. rank 0 reports its progress
# in the file SAC_EPOCH_FILE (.sac-job.<job id>.epochs in the submit directory, removed after a
# success). A job that Slurm requeues (sbatch --requeue: a failed node, preemption) finds that file
# again and resumes by itself.
set -uo pipefail

say() { printf 'sac-job: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 2
}

cmd="${1:-}"
[[ $cmd == train || $cmd == evaluate ]] || die "usage: sac-job.sh train|evaluate (got '${cmd}')"

config="${CONFIG:-config.toml}"
sac="${SAC_BIN:-$PWD/target/release/sac}"
# Deliberately split on spaces: SAC_ARGS holds several flags. (${extra[@]+…} below: bash < 4.4,
# still common on clusters, calls an empty array unbound under set -u.)
read -ra extra <<<"${SAC_ARGS:-}"

if [[ -n ${PBS_NP:-} ]]; then
  np="$PBS_NP"
elif [[ -n ${PBS_NODEFILE:-} && -r ${PBS_NODEFILE} ]]; then
  np="$(wc -l <"$PBS_NODEFILE")"
elif [[ -n ${SLURM_NTASKS:-} ]]; then
  np="$SLURM_NTASKS"
else
  np=1
fi
np="${np//[[:space:]]/}"
[[ $np =~ ^[1-9][0-9]*$ ]] || die "cannot tell the number of ranks (got '$np')"

[[ -x $sac ]] || die "no sac binary at $sac: run \`cargo build --release\` in $PWD, or set SAC_BIN"
[[ -f $config ]] || die "no config file $config (in $PWD): set CONFIG, e.g. qsub -v CONFIG=/path/to/config.toml"
# Deliberately split on spaces: SAC_MPIEXEC may hold flags (e.g. "mpiexec.openmpi --oversubscribe").
read -ra launcher <<<"${SAC_MPIEXEC:-mpiexec}"
((${#launcher[@]})) || die "SAC_MPIEXEC is empty"
mpiexec="${launcher[*]}"
command -v "${launcher[0]}" >/dev/null ||
  die "${launcher[0]} is not on PATH: load your site's MPI module in the job script"
restarts="${SAC_RESTARTS:-2}"
[[ $restarts =~ ^[0-9]+$ ]] || die "SAC_RESTARTS must be a whole number (got '$restarts')"
launch=("${launcher[@]}" -n "$np")
openmpi=""
launcher_version=$("${launcher[0]}" --version 2>&1 || true)
if [[ $launcher_version == *"Open MPI"* || $launcher_version == *OpenRTE* ]]; then
  # Open MPI's launcher: it passes only the variables named with -x to ranks on other nodes; it
  # answers SIGTERM by killing the ranks (SIGCONT, then SIGTERM after odls_base_sigkill_timeout
  # seconds, SIGKILL after as long again) but passes SIGUSR1 on at once, which sac takes as a stop
  # too: the stop this script passes on goes to it as SIGUSR1. The timeout (1 s by default) is
  # also how long the ranks of a failed job outlive a dead one, and how long ranks the scheduler
  # signalled itself at the time limit have to finish their step: 5 s by default here.
  openmpi=1
  launch+=(-x SAC_EPOCH_FILE)
  export OMPI_MCA_odls_base_sigkill_timeout="${OMPI_MCA_odls_base_sigkill_timeout:-5}"
fi

job_id="${PBS_JOBID:-${SLURM_JOB_ID:-local-$$}}"
say "job $job_id on $(hostname), $(date '+%F %T'), in $PWD"
stall="${SAC_STALL_ABORT:-900}"
[[ $stall =~ ^[0-9]+$ ]] || die "SAC_STALL_ABORT must be a whole number of seconds (got '$stall')"
export SAC_EPOCH_FILE="${SAC_EPOCH_FILE:-$PWD/.sac-job.${job_id//\//_}.epochs}"

# epochs_field N: field N of the epoch file (1 saved, 2 of, 3 started from, 4 "stopped" after a
# clean stop on a signal), or nothing.
epochs_field() { [[ -r $SAC_EPOCH_FILE ]] && awk -v n="$1" 'NR == 1 { print $n }' "$SAC_EPOCH_FILE"; }
has_arg() { local a; for a in ${extra[@]+"${extra[@]}"}; do [[ $a == "$1" ]] && return 0; done; return 1; }
# with_resume: the flags of a restart: --resume added, --overwrite dropped (the run to continue is
# the one this job started).
with_resume() {
  local a kept=()
  for a in ${extra[@]+"${extra[@]}"}; do [[ $a == --overwrite ]] || kept+=("$a"); done
  has_arg --resume || kept+=(--resume)
  extra=(${kept[@]+"${kept[@]}"})
}
# A job the scheduler requeued (Slurm counts it in SLURM_RESTART_COUNT) continues what it saved.
if [[ $cmd == train && ${SLURM_RESTART_COUNT:-0} -gt 0 && $(epochs_field 1) =~ ^[1-9] ]]; then
  say "requeued (SLURM_RESTART_COUNT=$SLURM_RESTART_COUNT): resuming after epoch $(epochs_field 1)"
  with_resume
fi

# A stop signal (the scheduler's SIGTERM at the time limit or on cancel, SIGINT, or SIGUSR1 ahead
# of the time limit: `sbatch --signal=B:USR1@300`) goes on to mpiexec as the one its ranks get at
# once: SIGUSR1 for Open MPI's, SIGTERM for Hydra (sac stops on either).
signalled="" pid=""
pass_on() {
  local as=TERM
  [[ -n $openmpi ]] && as=USR1
  [[ -n $pid ]] && kill -s "$as" "$pid" 2>/dev/null
}
forward() {
  signalled=$1
  say "received SIG$1: passing it on to mpiexec and waiting for sac to stop at a safe point"
  pass_on
}
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1
# Whether rank 0 wrote the epoch file during the attempt now ending (else it is an earlier one's).
stamp=$(mktemp "${TMPDIR:-/tmp}/sac-job.XXXXXX")
trap 'rm -f "$stamp"' EXIT
fresh() { [[ -r $SAC_EPOCH_FILE && $SAC_EPOCH_FILE -nt $stamp ]]; }

# cause_of RC: what an exit status of the launcher most likely means.
cause_of() {
  case $1 in
    1) echo "a rank failed or the job was aborted (an error, a stall past stall_abort, a non-finite loss: see above)" ;;
    101) echo "a rank panicked" ;;
    9 | 137) echo "a rank was killed (SIGKILL: out of memory, a lost node, or by hand)" ;;
    *) echo "the launcher exited with status $1" ;;
  esac
}

attempt=0
start=$SECONDS
while :; do
  say "$mpiexec -n $np $sac --config $config --set train.stall_abort=$stall $cmd ${extra[*]+${extra[*]}}"
  began=$SECONDS
  touch "$stamp"
  sleep 0.01 # a write in this attempt is newer than the stamp, also on coarse file-system clocks
  "${launch[@]}" "$sac" --config "$config" --set "train.stall_abort=$stall" "$cmd" ${extra[@]+"${extra[@]}"} &
  pid=$!
  # A signal that came while no mpiexec ran (between two attempts) goes to this one.
  [[ -n $signalled ]] && pass_on
  # `wait` returns early (status > 128) when a trapped signal arrives: wait again until mpiexec is
  # gone, then once more to read the exit status bash kept for it.
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid"
  done
  wait "$pid"
  rc=$?
  say "sac $cmd exited with status $rc after $((SECONDS - began)) s"
  [[ $cmd == train && $rc != 0 && $rc != 130 && -z $signalled ]] || break
  if [[ $rc == 2 ]]; then
    say "not restarting: the configuration, command line or data is wrong (exit 2, before the first step); fix it and resubmit"
    break
  fi
  saved=$(epochs_field 1) from=$(epochs_field 3)
  if ! fresh || [[ ! $saved =~ ^[0-9]+$ || ! $from =~ ^[0-9]+$ ]] || ((saved <= from)); then
    say "not restarting: this attempt saved no new epoch (it would fail at the same place again)"
    break
  fi
  if ((attempt >= restarts)); then
    say "not restarting: the restarts are used up (SAC_RESTARTS=$restarts)"
    break
  fi
  attempt=$((attempt + 1))
  say "restart $attempt of $restarts after $(cause_of "$rc"): resuming after epoch $saved (of $(epochs_field 2))"
  with_resume
done
trap - TERM INT USR1
((attempt > 0)) && say "the job ran $((SECONDS - start)) s in all, with $attempt restart(s)"
# After a signal the launcher's status can hide a clean stop (Open MPI's says 1 once it was
# signalled itself, MPICH 4.0's Hydra sometimes 0): rank 0's note says what happened.
if [[ $cmd == train && -n $signalled && $rc != 130 ]] && fresh && [[ $(epochs_field 4) == stopped ]]; then
  say "mpiexec exited with status $rc, but every rank stopped at a safe point on the signal (rank 0's note): exit 130"
  rc=130
fi
[[ $rc == 0 ]] && rm -f "$SAC_EPOCH_FILE"

if [[ $cmd == train && $rc == 130 ]]; then
  say "training stopped on a signal (walltime or qdel/scancel); the last complete epoch's checkpoint is intact."
  say "continue it by resubmitting with --resume, e.g.:"
  say "  qsub -v CONFIG=$config,SAC_ARGS=--resume jobs/train.pbs"
  say "  sbatch --export=ALL,CONFIG=$config,SAC_ARGS=--resume jobs/train.slurm"
fi
exit "$rc"
