#!/usr/bin/env bash
# Packs sac for a machine that has PyTorch but nothing else of sac's: a stripped `sac`, the shared
# libraries it and MPICH need beyond libtorch and the C/C++ runtime (MPICH, UCX, hwloc,
# TurboJPEG, ...), MPICH's mpiexec and hydra proxy, a ready Fashion-MNIST data dir, the GPU check
# (bench/gpu.sh) and a launcher `./run COMMAND...`. One .tar.gz; its path is the last line printed.
#
#   scripts/device-bundle.sh [--sac BINARY] [--sample FRACTION] [--out FILE]
#
#   --sac BINARY      bundle this sac instead of building `cargo build --release`
#   --sample F        the Fashion-MNIST sample of the data dir (default 0.1: the default config's)
#   --out FILE        the archive (default target/device-bundle/sac-bundle.tar.gz)
#
# On the other machine:  tar xzf sac-bundle.tar.gz && cd sac-bundle && ./run mpiexec -n 2 sac mpi-check
# `./run` puts bin/ first on PATH and lib/ plus that machine's torch lib/ (from its python3, or
# $SAC_TORCH_LIB) on LD_LIBRARY_PATH. The archive is at most 60 MiB (the GPU machine's carry limit
# is 64 MiB with the working tree).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

sac="" sample=0.1 out="$root/target/device-bundle/sac-bundle.tar.gz"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --sac) sac="$2"; shift 2 ;;
    --sample) sample="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "device-bundle: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
log() { printf '\033[1mdevice-bundle:\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
readonly LIMIT_MIB=60

if [[ -z "$sac" ]]; then
  bash scripts/setup.sh
  log "building sac (cargo build --release)"
  cargo build --release >&2
  sac="$root/target/release/sac"
fi
[[ -x "$sac" ]] || die "$sac is not an executable"
torch_lib="$(readelf -d "$sac" | sed -n 's/.*(RUNPATH).*\[\(.*\)\]/\1/p' | tr ':' '\n' | grep -m1 . || true)"
[[ -n "$torch_lib" && -e "$torch_lib/libtorch_cpu.so" ]] || die "cannot tell which libtorch $sac was built against (no RUNPATH to a libtorch)"
torch_lib="$(cd "$torch_lib" && pwd -P)"
mpiexec="$(readlink -f "$(command -v mpiexec)")" || die "no mpiexec on PATH (scripts/setup.sh installs MPICH)"
"$mpiexec" --version 2>&1 | grep -q HYDRA || die "$mpiexec is not MPICH's hydra (the bundle carries MPICH)"
proxy="$(dirname "$mpiexec")/hydra_pmi_proxy"
[[ -x "$proxy" ]] || die "no hydra_pmi_proxy beside $mpiexec"

work="$(mktemp -d "${TMPDIR:-/tmp}/sac-bundle.XXXXXX")"
trap 'rm -rf "$work"' EXIT
b="$work/sac-bundle"
mkdir -p "$b/bin" "$b/lib/ucx" "$b/bench"

log "programs: sac (stripped), mpiexec and hydra_pmi_proxy from $(dirname "$mpiexec")"
strip -o "$b/bin/sac" "$sac"
cp "$mpiexec" "$b/bin/mpiexec"
cp "$proxy" "$b/bin/hydra_pmi_proxy"
# UCX's shared-memory transport by cross-memory attach, loaded as a module from UCX_MODULE_DIR.
ucx_dir=/usr/lib/x86_64-linux-gnu/ucx
for m in "$ucx_dir"/libuct_cma.so.0; do
  [[ -e "$m" ]] && cp -L "$m" "$b/lib/ucx/libuct_cma.so.0" && ln -sf libuct_cma.so.0 "$b/lib/ucx/libuct_cma.so"
done

# Every library the programs need, except libtorch and what comes with it (the other machine's
# PyTorch provides them) and the C and C++ runtime (any machine that runs PyTorch has them).
base='^(linux-vdso|ld-linux-x86-64|libc|libm|libdl|libpthread|librt|libutil|libresolv|libstdc\+\+|libgcc_s)\.so'
missing=""
while read -r name path; do
  [[ "$name" =~ $base ]] && continue
  if [[ "$path" == "not" ]]; then
    missing+=" $name"
    continue
  fi
  case "$(readlink -f "$path")" in
    "$torch_lib"/* | */site-packages/*) continue ;;
  esac
  cp -L "$path" "$b/lib/$name"
done < <(for f in "$sac" "$mpiexec" "$proxy" "$b"/lib/ucx/*.so.0; do ldd "$f"; done |
  awk '/=>/ {print $1, $3}' | sort -u)
[[ -z "$missing" ]] || die "libraries not found here:$missing"
log "libraries: $(cd "$b/lib" && ls -1 *.so* | tr '\n' ' ')"

log "the launcher ./run, the GPU check bench/gpu.sh and its helpers"
cat >"$b/run" <<'EOF'
#!/bin/sh
# ./run COMMAND... : COMMAND with this bundle's programs first on PATH and its libraries plus
# PyTorch's (this machine's: the torch of `python3`, or $SAC_TORCH_LIB) on LD_LIBRARY_PATH.
# E.g. ./run mpiexec -n 2 sac mpi-check;  ./run ldd "$(./run sh -c 'command -v sac')"
here=$(cd "$(dirname "$0")" && pwd)
torch_lib=${SAC_TORCH_LIB:-}
if [ -z "$torch_lib" ]; then
  torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null) || torch_lib=""
  if [ -n "$torch_lib" ]; then
    have=$(python3 -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)
    want=$(cat "$here/TORCH_VERSION")
    [ "$have" = "$want" ] || echo "run: warning: this sac was built against torch $want, python3 has $have" >&2
  fi
fi
if [ ! -e "$torch_lib/libtorch_cpu.so" ]; then
  echo "run: no libtorch found: put the python3 that has torch first on PATH, or set SAC_TORCH_LIB to torch's lib/ directory" >&2
  exit 2
fi
PATH="$here/bin:$PATH"
LD_LIBRARY_PATH="$here/lib:$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
UCX_MODULE_DIR="$here/lib/ucx"
SAC_BUNDLE="$here"
export PATH LD_LIBRARY_PATH UCX_MODULE_DIR SAC_BUNDLE
exec "$@"
EOF
chmod +x "$b/run"
"$root/.venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' >"$b/TORCH_VERSION" 2>/dev/null ||
  basename "$(dirname "$torch_lib")" >"$b/TORCH_VERSION"
cp bench/gpu.sh bench/gpu_limit.py bench/gpu_table.py bench/herbarium_gen.py bench/gpu_reference.json "$b/bench/"
cp config.toml "$b/config.toml"
git -C "$root" rev-parse --short HEAD >"$b/COMMIT" 2>/dev/null || echo unknown >"$b/COMMIT"
echo "$sample" >"$b/SAMPLE" # bench/gpu.sh compares with its CPU reference only on the same sample

log "data: Fashion-MNIST sample $sample (sac create-dataset, the default config's data dir)"
(cd "$b" && SAC_TORCH_LIB="$torch_lib" ./run sac --config config.toml -q create-dataset --sample "$sample") >&2 ||
  die "create-dataset failed"
rm -f "$b/sac.log"

mkdir -p "$(dirname "$out")"
tar -C "$work" -czf "$out.tmp" sac-bundle
size=$(stat -c %s "$out.tmp")
if (( size > LIMIT_MIB * 1024 * 1024 )); then
  rm -f "$out.tmp"
  die "the bundle is $((size / 1048576)) MiB, over the $LIMIT_MIB MiB limit"
fi
mv "$out.tmp" "$out"
log "$(numfmt --to=iec "$size") in $out (unpack it and run: ./run bash bench/gpu.sh)"
echo "$out"
