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
