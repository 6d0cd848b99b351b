#!/usr/bin/env bash
# scripts/build.sh [--mpi mpich|openmpi] [CARGO BUILD FLAGS...]: the release binary of sac, built
# against one MPI family.
#
#   scripts/build.sh                          # MPICH (and Intel MPI, Cray MPICH, MVAPICH): target/release/sac
#   scripts/build.sh --mpi openmpi            # Open MPI: target/openmpi/release/sac
#   scripts/build.sh --mpi openmpi --features fault-injection   # what the tests' Open MPI stage runs
#
# The MPI comes from its compiler wrapper (rsmpi's build probe runs `$MPICC -show`):
#   mpich:   $MPICC if set, else Debian's mpicc.mpich, else mpicc
#   openmpi: $MPICC if set, else Debian's mpicc.openmpi, else mpicc
# On a cluster, load the MPI module first (`module load OpenMPI`): its mpicc is the one on PATH.
# Debian's `mpicc` and `mpiexec` are alternatives that point at whichever MPI apt installed last;
# naming the wrapper keeps each build on its own MPI whatever they point at.
#
# How the Open MPI build shares the MPICH build's work: it runs in the same target dir with one
# profile setting changed for the mpi-sys crate only (codegen-units, which does not change what
# it computes). Cargo then gives mpi-sys, and so the crates that depend on it (mpi, sac), their
# own artifacts, and runs mpi-sys's build script afresh against Open MPI, while polars, tch and
# the other ~400 crates are the MPICH build's, already compiled: the Open MPI build takes the time
# of sac's own crate (~3 min here), not of everything (~10 min). The binary is then copied to
# target/openmpi/release/sac, and target/release/sac is put back as it was (the MPICH build's).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

mpi=mpich
if [[ ${1:-} == --mpi ]]; then
  mpi=${2:?--mpi needs mpich or openmpi}
  shift 2
fi
case $mpi in
  mpich | openmpi) ;;
  *) echo "scripts/build.sh: --mpi $mpi: mpich or openmpi" >&2; exit 2 ;;
esac
[[ -n ${LIBTORCH:-} ]] || export LIBTORCH="$root/.venv/libtorch"

if [[ -z ${MPICC:-} ]]; then
  if command -v "mpicc.$mpi" >/dev/null; then
    MPICC="mpicc.$mpi"
  else
    MPICC=mpicc
  fi
fi
command -v "$MPICC" >/dev/null || {
  echo "scripts/build.sh: no MPI compiler wrapper $MPICC on PATH (Debian: apt install lib$mpi-dev; a cluster: module load)" >&2
  exit 2
}
# The wrapper must be of the family asked for: MPICH's links -lmpich, Open MPI's -lmpi.
show=$("$MPICC" -show 2>/dev/null || true)
if [[ $mpi == openmpi && " $show " == *" -lmpich "* ]] || [[ $mpi == mpich && " $show " == *" -lmpi "* ]]; then
  echo "scripts/build.sh: $MPICC is not $mpi's compiler wrapper ($show): set MPICC to it" >&2
  exit 2
fi
export MPICC
echo "scripts/build.sh: building against $mpi with $MPICC: $show" >&2

if [[ $mpi == mpich ]]; then
  exec cargo build --release "$@"
fi

# The MPICH build's binary, kept aside: this build's binary replaces target/release/sac.
out=target/release/sac
[[ -e $out ]] && ln -f "$out" target/release/.sac-mpich
cargo build --release --bin sac --config 'profile.release.package.mpi-sys.codegen-units=15' "$@"
mkdir -p target/openmpi/release
cp "$out" target/openmpi/release/sac.tmp
mv target/openmpi/release/sac.tmp target/openmpi/release/sac
if [[ -e target/release/.sac-mpich ]]; then
  mv target/release/.sac-mpich "$out"
else
  rm -f "$out"
fi
linked=$(ldd target/openmpi/release/sac)
[[ $linked == *libmpi.so.40* ]] || {
  echo "scripts/build.sh: target/openmpi/release/sac is not linked to Open MPI's libmpi.so.40:" >&2
  ldd target/openmpi/release/sac | grep -i mpi >&2
  exit 1
}
echo "scripts/build.sh: built target/openmpi/release/sac (linked to Open MPI's libmpi.so.40)" >&2
