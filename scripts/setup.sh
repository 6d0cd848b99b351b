#!/usr/bin/env bash
# Installs what sac needs and skips what is already there. Safe to run again.
#   - Debian packages: MPICH (+ libclang for rsmpi's bindgen), libjpeg-turbo's TurboJPEG, Fashion-MNIST,
#     pkg-config; iproute2 and util-linux for the emulated cluster of tests/multinode; Open MPI for
#     the tests' Open MPI stage (scripts/build.sh --mpi openmpi)
#   - Debian's mpicc/mpiexec alternatives set to MPICH's (installing Open MPI moves them to its own):
#     `cargo build` and every `mpiexec` of the tests and scripts stay MPICH's
#   - .venv/ with torch==2.11.0 (libtorch for tch 0.24; the CUDA 13.0 wheel) and the test/benchmark Python packages
# Set SAC_SKIP_APT=1 on a machine where you cannot use apt (a cluster): then provide MPI yourself.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

apt_pkgs=(mpich libmpich-dev libclang-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist fonts-dejavu-core iproute2 util-linux
  openmpi-bin libopenmpi-dev)
if [[ "${SAC_SKIP_APT:-0}" != 1 ]]; then
  bash scripts/apt-ensure.sh "${apt_pkgs[@]}" # says what failed, and exits non-zero then
  log "Debian packages present"
  # Which MPI `mpicc`, `mpiexec` and <mpi.h> are depends on which of the two apt installed last:
  # name MPICH's, so that nothing depends on that order.
  if [[ $(id -u) == 0 ]] && command -v update-alternatives >/dev/null; then
    pin() { # pin GROUP PATH: the alternative GROUP points at PATH (if Debian offers it)
      local q
      q=$(update-alternatives --query "$1" 2>/dev/null || true)
      if [[ $'\n'$q$'\n' == *$'\n'"Alternative: $2"$'\n'* ]]; then
        [[ $(sed -n 's/^Value: //p' <<<"$q") == "$2" ]] || update-alternatives --quiet --set "$1" "$2"
      fi
    }
    arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -dumpmachine)
    pin mpi /usr/bin/mpicc.mpich
    pin mpirun /usr/bin/mpirun.mpich
    pin "mpi-$arch" "/usr/include/$arch/mpich"
    log "mpicc, mpiexec and mpi.h are MPICH's ($(readlink -f /usr/bin/mpiexec)); Open MPI's: mpicc.openmpi, mpiexec.openmpi"
  fi
fi

venv="$root/.venv"
stamp="$venv/.sac-requirements"
want="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  log "Python virtualenv up to date (.venv)"
else
  # The CUDA wheel and its nvidia-* libraries unpack to about 4.7 GiB; pip also needs room for the
  # downloads while it installs, and the release build (MPICH and Open MPI) about 6 GiB more. A full
  # disk half-way through leaves a venv that fails later in confusing ways: say so before starting.
  need_gib=${SAC_SETUP_MIN_FREE_GIB:-12}
  for dir in "$root" "${TMPDIR:-/tmp}"; do
    free_kib=$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')
    if [[ -n "$free_kib" ]] && ((free_kib < need_gib * 1024 * 1024)); then
      log "error: $dir has $((free_kib / 1024 / 1024)) GiB free; installing torch into .venv and building sac need about $need_gib GiB (df -h $dir shows what is there; SAC_SETUP_MIN_FREE_GIB changes the bound)"
      exit 1
    fi
  done
  log "creating .venv and installing requirements.txt (torch is a large download, about a minute)"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
  # --no-cache-dir: pip's cache would keep a second copy of the multi-GiB wheels.
  "$venv/bin/python" -m pip install -q --no-cache-dir --upgrade pip
  "$venv/bin/python" -m pip install -q --no-cache-dir -r requirements.txt
  echo "$want" >"$stamp"
fi
# A stable path to the wheel's libtorch (include/ + lib/) for .cargo/config.toml, whatever the Python version.
torch_dir="$("$venv/bin/python" -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parent)')"
ln -sfn "$torch_dir" "$venv/libtorch"
log "done"
