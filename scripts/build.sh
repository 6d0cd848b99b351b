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
# (or MPI_PKG_CONFIG / CRAY_MPICH_DIR, which the probe takes first: Cray MPICH has no mpicc).
# Note: mpi-sys does not notice a change of MPI by itself (its build script runs again only when
# its own files change): after switching modules, `cargo clean -p mpi-sys --release` first.
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
if [[ -n ${MPI_PKG_CONFIG:-} || -n ${CRAY_MPICH_DIR:-} ]]; then
  # rsmpi's probe takes these before any wrapper (Cray MPICH has no mpicc).
  echo "scripts/build.sh: building against $mpi from ${MPI_PKG_CONFIG:+MPI_PKG_CONFIG=$MPI_PKG_CONFIG}${CRAY_MPICH_DIR:+CRAY_MPICH_DIR=$CRAY_MPICH_DIR}" >&2
else
  command -v "$MPICC" >/dev/null || {
    echo "scripts/build.sh: no MPI compiler wrapper $MPICC on PATH (Debian: apt install lib$mpi-dev; a cluster: module load)" >&2
    exit 2
  }
  # The wrapper must be of the family asked for: only Open MPI's answers --showme (MPICH, Intel
  # MPI and MVAPICH say -show).
  if "$MPICC" --showme >/dev/null 2>&1; then family=openmpi; else family=mpich; fi
  if [[ $family != "$mpi" ]]; then
    echo "scripts/build.sh: $MPICC is $family's compiler wrapper, not $mpi's: set MPICC to it" >&2
    exit 2
  fi
  export MPICC
  echo "scripts/build.sh: building against $mpi with $MPICC: $("$MPICC" -show 2>/dev/null)" >&2
fi

if [[ $mpi == mpich ]]; then
  exec cargo build --release "$@"
fi

# The MPICH build's binary, kept aside while this build's replaces target/release/sac, and put back
# on every way out (also a failed build or Ctrl-C). A copy kept by a run that was killed is put
# back first.
out=target/release/sac kept=target/release/.sac-mpich
mkdir -p target/release target/openmpi/release
if [[ -e $kept ]]; then
  mv -f "$kept" "$out"
fi
[[ -e $out ]] && ln -f "$out" "$kept"
restore() {
  if [[ -e $kept ]]; then
    mv -f "$kept" "$out"
  else
    rm -f "$out"
  fi
}
trap restore EXIT
cargo build --release --bin sac --config 'profile.release.package.mpi-sys.codegen-units=15' "$@"
cp "$out" target/openmpi/release/sac.tmp
linked=$(ldd target/openmpi/release/sac.tmp)
if [[ $linked != *libmpi.so.40* ]]; then
  echo "scripts/build.sh: the Open MPI build is not linked to Open MPI's libmpi.so.40:" >&2
  grep -i mpi <<<"$linked" >&2
  rm -f target/openmpi/release/sac.tmp
  exit 1
fi
mv target/openmpi/release/sac.tmp target/openmpi/release/sac
echo "scripts/build.sh: built target/openmpi/release/sac (linked to Open MPI's libmpi.so.40)" >&2
