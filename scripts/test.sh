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
