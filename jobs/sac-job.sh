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
# Rank count: PBS_NP, else the lines of PBS_NODEFILE (Torque/PBS), else SLURM_NTASKS (Slurm, and
# Slurm's qsub wrapper, which sets no PBS_* variables), else 1.
#
# Signals: at the walltime (and on qdel/scancel) the scheduler sends SIGTERM; sac then stops every
# rank at a step boundary with the last complete checkpoint intact, and exits 130. mpiexec runs in
# the background so that this shell, which receives the signal too, passes it on and then waits for
# sac to finish instead of exiting first (`qsig` on PBS and `scancel -b` on Slurm signal only this
# shell). The scheduler's SIGKILL follows after a grace period (Slurm KillWait, 30 s by default;
# PBS kill_delay, often a few seconds): a training step must end within it for the clean stop. A
# rank that waits for peers which do not come ends the job itself 20 s after the signal.
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
command -v mpiexec >/dev/null || die "mpiexec is not on PATH: load your site's MPI module in the job script"

job_id="${PBS_JOBID:-${SLURM_JOB_ID:-none}}"
say "job $job_id on $(hostname), $(date '+%F %T'), in $PWD"
stall="${SAC_STALL_ABORT:-900}"
[[ $stall =~ ^[0-9]+$ ]] || die "SAC_STALL_ABORT must be a whole number of seconds (got '$stall')"
say "mpiexec -n $np $sac --config $config --set train.stall_abort=$stall $cmd ${extra[*]+${extra[*]}}"
start=$SECONDS

mpiexec -n "$np" "$sac" --config "$config" --set "train.stall_abort=$stall" "$cmd" ${extra[@]+"${extra[@]}"} &
pid=$!
forward() {
  say "received SIG$1: passing it on to mpiexec and waiting for sac to stop at a safe point"
  kill -s "$1" "$pid" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# `wait` returns early (status > 128) when a trapped signal arrives: wait again until mpiexec is
# gone, then once more to read the exit status bash kept for it.
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"
done
wait "$pid"
rc=$?
trap - TERM INT

say "sac $cmd exited with status $rc after $((SECONDS - start)) s"
if [[ $cmd == train && $rc == 130 ]]; then
  say "training stopped on a signal (walltime or qdel/scancel); the last complete epoch's checkpoint is intact."
  say "continue it by resubmitting with --resume, e.g.:"
  say "  qsub -v CONFIG=$config,SAC_ARGS=--resume jobs/train.pbs"
  say "  sbatch --export=ALL,CONFIG=$config,SAC_ARGS=--resume jobs/train.slurm"
fi
exit "$rc"
