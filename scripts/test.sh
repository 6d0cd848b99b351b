#!/usr/bin/env bash
# The whole test suite: set-up, a formatting check, then unit and integration tests
# (the integration tests run the real binary, under mpiexec where MPI is involved).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup.sh
echo "== cargo fmt --check" >&2
cargo fmt --check
echo "== cargo test" >&2
# The tests use the venv's Python (torchvision interop) and MPICH's mpiexec.
export SAC_PYTHON="$root/.venv/bin/python"
cargo test --release -- --test-threads=1
echo "== scheduler test: jobs/*.pbs and jobs/*.slurm on a one-node Slurm (installs slurm-wlm, needs root)" >&2
bash tests/scheduler/run.sh
echo "== benchmark harness, smoke mode (checks the harness runs, not speeds)" >&2
bash bench/run.sh --smoke >/dev/null
