#!/usr/bin/env bash
# The whole test suite: set-up, a formatting check, then unit and integration tests
# (the integration tests run the real binary, under mpiexec where MPI is involved), clippy,
# the scheduler test and the benchmark harness in smoke mode. Prints how long each stage took.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

started=$SECONDS
stage() { # stage NAME COMMAND...
  local name=$1 t0=$SECONDS
  shift
  echo "== $name" >&2
  "$@"
  echo "== $name: done in $((SECONDS - t0)) s ($((SECONDS - started)) s in all)" >&2
}

stage "set-up" bash scripts/setup.sh
stage "cargo fmt --check" cargo fmt --check
# The tests use the venv's Python (torchvision interop) and MPICH's mpiexec.
export SAC_PYTHON="$root/.venv/bin/python"
# The fault-injection feature compiles in the fault points tests/faults.rs uses (inert without SAC_FAULT).
stage "cargo test" cargo test --release --features fault-injection -- --test-threads=1
# The same binary built against Open MPI (only mpi-sys, mpi and sac are compiled again), and the
# tests that cover what differs between the two MPIs, run with it under Open MPI's launcher
# (tests/common: SAC_TEST_MPI): mpi-check, training at 1, 2, 4 ranks and resume, the overlapped
# exchange, evaluate's pipeline at 4-6 ranks (also under forced rendezvous), the fault cases and
# stop signals, the job script's restarts, and the emulated two-host cluster (tests/multinode).
stage "Open MPI: build (scripts/build.sh --mpi openmpi)" \
  bash scripts/build.sh --mpi openmpi --features fault-injection
stage "Open MPI: tests" env SAC_TEST_MPI=openmpi cargo test --release --features fault-injection \
  --test mpi --test restarts --test train --test evaluate --test faults --test multinode -- --test-threads=1 \
  mpi_check_is_exact the_mpi_under_test_trains a_rank_killed_in_epoch_2 a_configuration_error_exits_2 restarts_stop_when \
  an_attempt_that_saves usr1_to_the_job_script gradient_averaged uneven_shards resuming_after_one_epoch exchange_during_backward \
  sigterm_to_mpiexec missing_train_csv pipeline_on_4_and_6 pipeline_under_forced panic_on_one_rank \
  kill_9_of_one_rank sigstop_of_one_rank sigterm_during_validation sigterm_during_saving sigterm_while_a_peer \
  mpi_check_across_two_hosts training_and_evaluation_across_two_hosts the_cluster_is_removed
# In the release profile, after the tests' build: it reuses its build scripts (libtorch's C++ shim),
# which a dev-profile clippy would compile again.
stage "cargo clippy" cargo clippy --release --all-targets --all-features -- -D warnings
stage "scheduler test: jobs/*.pbs and jobs/*.slurm on a one-node Slurm (installs slurm-wlm, needs root)" \
  bash tests/scheduler/run.sh
# Each harness step has its own time bound (bench/run.sh); this one bounds the whole smoke run.
stage "benchmark harness, smoke mode (checks the harness runs, not speeds)" \
  timeout --kill-after=30 1200 bash bench/run.sh --smoke >/dev/null
stage "CPU precision harness, smoke mode (sac f32/auto against DDP and the limits; checks it runs)" \
  timeout --kill-after=30 600 bash bench/cpu_precision.sh --smoke >/dev/null
