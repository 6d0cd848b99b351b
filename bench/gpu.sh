#!/usr/bin/env bash
# The GPU check: what sac does on a CUDA GPU, in one run of at most 8 minutes. Run it inside the
# unpacked device bundle (scripts/device-bundle.sh) through its launcher:
#
#   tar xzf sac-bundle.tar.gz && cd sac-bundle && ./run bash bench/gpu.sh [--quick]
#
# 1. the machine: nvidia-smi, torch, CPU model and cores
# 2. mpi-check on cuda, 1 and 2 ranks: averaging exact, exchange and optimizer time
# 3. training resnet18 at 64 px on the bundled Fashion-MNIST sample, 2 epochs: cuda f32 and bf16
#    on 1 rank, bf16 on 2 ranks sharing the GPU; the loss falls and top-1 is within 2 points of
#    the CPU's (bench/gpu_reference.json, measured with the same settings; BENCHMARKS.md)
# 4. resnet50 at 224 px, bf16 + channels-last: PyTorch's forward + backward on pre-loaded tensors
#    (the limit; also with Adam's step), sac's epoch from its decode cache, and sac's first epoch
#    from JPEGs (decode-bound; images/s per decode thread)
# 5. evaluate with the predictor on cuda: images/s, and agreement with the CPU's predictions
#
# Results go to $OUT when set (the device tool's folder), else bench/results/: gpu-<time>.jsonl
# (one JSON object per check), gpu-<time>.md (the summary table, also printed) and gpu-<time>.log
# (every command's output). Exits 1 if a command failed (the table still comes), 0 otherwise,
# whether or not the speed targets hold.
#
#   --quick        steps 3 and 4 shrunk to seconds (a smoke run of the script, not figures)
#   --device cpu   everything on the CPU instead (with --quick: tests/bundle.rs runs the script so)
set -uo pipefail
here="${SAC_BUNDLE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
cd "$here" || exit 2
quick=0 device=cuda
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --device) device="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1 (--quick, --device cpu|cuda)" >&2; exit 2 ;;
  esac
done
if ! command -v sac >/dev/null || ! command -v mpiexec >/dev/null; then
  echo "gpu.sh: run it through the bundle's launcher: ./run bash bench/gpu.sh" >&2
  exit 2
fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
res="${OUT:-$here/bench/results}"
mkdir -p "$res"
jsonl="$res/gpu-$stamp.jsonl" log="$res/gpu-$stamp.log" table="$res/gpu-$stamp.md"
: >"$jsonl"
: >"$log"
work="$(mktemp -d "${TMPDIR:-/tmp}/sac-gpu.XXXXXX")"
trap 'rm -rf "$work"' EXIT
started=$SECONDS
say() { printf '\033[1mgpu.sh:\033[0m %s\n' "$*" >&2; printf '== %s\n' "$*" >>"$log"; }
# record JSON: one object per check, written by python3 (which has torch) from words KEY=TEXT (kept
# as a string, whatever it looks like: a commit such as 12e9322 is not the number 1.2e9326) and
# KEY:=JSON (a number, true/false, null, a list or an object; anything else, or a number JSON cannot
# hold, is kept as text and the log says so).
record() { python3 - "$log" "$@" >>"$jsonl" <<'EOF'
import json, math, sys
def refuse(c):
    raise ValueError(c)
obj = {}
for kv in sys.argv[2:]:
    k, _, v = kv.partition("=")
    if not k.endswith(":"):
        obj[k] = v
        continue
    k = k[:-1]
    try:
        obj[k] = json.loads(v, parse_constant=refuse)
        if isinstance(obj[k], float) and not math.isfinite(obj[k]):
            raise ValueError("not finite")
    except ValueError as e:
        obj[k] = v
        with open(sys.argv[1], "a") as log:
            print(f"record: {k}={v!r} is not JSON ({e}); kept as text", file=log)
print(json.dumps(obj, allow_nan=False))
EOF
}
# run SECONDS NAME COMMAND...: the command's output goes to the log; its status is returned.
run() {
  local limit=$1 name=$2
  shift 2
  printf -- '-- %s: %s\n' "$name" "$*" >>"$log"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  printf -- '-- %s: exit %s after %s s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$log"
  return $rc
}
# after MARKER PREFIX: the number right after PREFIX in the log's last line holding MARKER
# ("null" if none), e.g. after 'gradient averaging over' 'relative error '.
after() { python3 - "$log" "$1" "$2" <<'EOF'
import re, sys
log, marker, prefix = sys.argv[1:4]
lines = [l for l in open(log, errors="replace") if marker in l]
m = re.search(re.escape(prefix) + r"([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)", lines[-1]) if lines else None
print(m.group(1) if m else "null")
EOF
}
# The Adam step's time in mpi-check's last line about it (the GPU's, or the CPU's on one thread).
adam_ms() {
  if [[ $device == cuda ]]; then after 'Adam step on the GPU' 'all ranks at once): '; else after 'fused Adam step' '1 thread '; fi
}
state() { python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(json.dumps(s['history']))" "$1"; }

# ---------------------------------------------------------------------------------------------
say "1/5 the machine"
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>>"$log" | head -1)
nvidia-smi >>"$log" 2>&1 || gpu="none (nvidia-smi: $(command -v nvidia-smi || echo absent))"
torchv=$(python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>>"$log")
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
record check=machine gpu="$gpu" torch="$torchv" cpu="$cpu" cores:="$(nproc)" bundle="$(cat COMMIT)" \
  sac_torch="$(cat TORCH_VERSION)" sample:="$(cat SAMPLE 2>/dev/null || echo null)" device=$device quick:=$quick

# ---------------------------------------------------------------------------------------------
say "2/5 mpi-check on $device, 1 and 2 ranks"
export UCX_WARN_UNUSED_ENV_VARS=n
for n in 1 2; do
  if run 150 "mpi-check -n $n" mpiexec -n $n sac mpi-check --device $device --reps 5; then ok=true; else ok=false; fi
  if [[ $ok == false && $n == 2 && -z "${UCX_TLS:-}" ]]; then
    say "two ranks failed with UCX's default transports; again over TCP (UCX_TLS=tcp,self) for the rest of the run"
    export UCX_TLS=tcp,self
    if run 150 "mpi-check -n $n, tcp" mpiexec -n $n sac mpi-check --device $device --reps 5; then ok=true; fi
  fi
  record check=mpi-check ranks:=$n ok:=$ok relative_error:="$(after 'gradient averaging over' 'relative error ')" \
    fused_ms:="$(after 'ms per step: fused' 'fused ')" adam_ms:="$(adam_ms)" \
    ucx_tls="${UCX_TLS:-default}"
done

# ---------------------------------------------------------------------------------------------
say "3/5 resnet18, 64 px, bundled Fashion-MNIST sample, 2 epochs on $device"
epochs=2
# two epochs also in --quick: "loss falls" needs two losses
for spec in "1 f32" "1 bf16" "2 bf16"; do
  read -r n prec <<<"$spec"
  ck="$work/ck-r18-$n-$prec"
  set -- --config config.toml train --epochs $epochs --overwrite --set "paths.checkpoint_dir=\"$ck\"" \
    --set "train.device=\"$device\"" --set "train.precision=\"$prec\"" --set "paths.log_file=\"$work/sac.log\""
  if run 240 "train resnet18 -n $n $prec" mpiexec -n $n sac "$@"; then ok=true; else ok=false; fi
  hist='[]'
  [[ -f "$ck/resnet18/state.json" ]] && hist=$(state "$ck/resnet18/state.json")
  record check=train-resnet18 ranks:=$n precision=$prec ok:=$ok history:="$hist"
done

# ---------------------------------------------------------------------------------------------
say "4/5 resnet50, bf16 + channels-last: PyTorch's limit, sac from cache and from JPEGs"
batch=256 classes=100 images=8192 size=800x1200 side=224 reps=(--warmup 10 --steps 30)
[[ $quick == 1 ]] && batch=8 classes=10 images=96 size=200x300 side=64 reps=(--warmup 1 --steps 2)
if run 180 "PyTorch limit" python3 bench/gpu_limit.py --model resnet50 --size $side --batch $batch --precision bf16 \
  --channels-last --device $device "${reps[@]}"; then
  grep -a '^{"what"' "$log" | tail -2 | while read -r line; do record check=pytorch-limit result:="$line"; done
else
  record check=pytorch-limit ok:=false
fi
herb="$work/herb" data="$work/herb-data"
if run 150 "JPEGs" python3 bench/herbarium_gen.py "$herb" --classes $classes --images $images --test-images 64 --size $size &&
  run 120 "create-dataset" sac --config config.toml create-dataset --sample 1.0 --set 'dataset.format="coco"' \
    --set "dataset.source=\"$herb/train/metadata.json\"" --set "paths.data_dir=\"$data\"" \
    --set 'dataset.test_fraction=0.01' --set 'dataset.place="symlink"' --set "paths.log_file=\"$work/sac.log\""; then
  ck="$work/ck-r50"
  set -- --config config.toml train --model resnet50 --epochs 2 --overwrite --set "paths.data_dir=\"$data\"" \
    --set "paths.checkpoint_dir=\"$ck\"" --set "image.width=$side" --set "image.height=$side" \
    --set "train.batch_size=$batch" --set "train.device=\"$device\"" --set 'train.precision="bf16"' \
    --set 'train.channels_last=true' --set 'train.validate=false' --set 'train.cache=true' \
    --set "paths.log_file=\"$work/sac.log\""
  if run 240 "train resnet50" sac "$@"; then ok=true; else ok=false; fi
  hist='[]'
  [[ -f "$ck/resnet50/state.json" ]] && hist=$(state "$ck/resnet50/state.json")
  threads=$(grep -a 'thread(s) per rank decode each batch' "$log" | tail -1 | sed -n 's/.*INFO *\([0-9]*\) thread(s).*/\1/p')
  record check=train-resnet50 ok:=$ok batch:=$batch side:=$side images:=$images jpeg_size=$size decode_threads:="${threads:-1}" \
    history:="$hist"
else
  record check=train-resnet50 ok:=false
fi

# ---------------------------------------------------------------------------------------------
say "5/5 evaluate: the predictor on $device against the CPU"
ck="$work/ck-r18-1-f32/resnet18/model.safetensors"
devices=$device
[[ $device != cpu ]] && devices="$device cpu"
for dev in $devices; do
  if [[ -f "$ck" ]] && run 150 "evaluate $dev" sac --config config.toml evaluate --checkpoint "$ck" \
    --set "paths.output_dir=\"$work/eval-$dev\"" --set "train.device=\"$dev\"" --set "paths.log_file=\"$work/sac.log\""; then
    ok=true
  else
    ok=false
  fi
  ips=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['images_per_second'])" "$work/eval-$dev/metrics.json" 2>/dev/null)
  record check=evaluate device=$dev ok:=$ok images_per_second:="${ips:-null}"
done
agree=$(python3 - "$work/eval-$device/predictions.csv" "$work/eval-cpu/predictions.csv" <<'EOF' 2>>"$log"
import csv, sys
a, b = ({r["Id"]: r["Predicted"] for r in csv.DictReader(open(p))} for p in sys.argv[1:3])
print(sum(a[k] == b.get(k) for k in a) / max(len(a), 1))
EOF
)
record check=evaluate-agreement agreement:="${agree:-null}"

say "done in $((SECONDS - started)) s"
python3 bench/gpu_table.py "$jsonl" bench/gpu_reference.json | tee "$table"
failed=$(grep -c '"ok": false' "$jsonl")
if [[ $failed -gt 0 ]]; then
  say "$failed check(s) failed to run: see $log"
  exit 1
fi
