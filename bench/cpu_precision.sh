#!/usr/bin/env bash
# sac's CPU fast path (train.precision = "auto": bf16 autocast where the CPU has avx512_bf16 or
# amx_bf16) against sac in f32, PyTorch DDP as users run it (f32), DDP with autocast +
# channels-last (the best-tuned peer) and the compute limit (forward + backward on pre-loaded
# tensors) in both precisions; resnet18, batch 64 per rank, Adam, one torch thread per rank, at
# 64 and 128 px, N = 1 and 2; rounds interleaved so that drift falls on all alike.
#
#   bench/cpu_precision.sh             # 3 rounds (about 20 minutes on 2 cores)
#   bench/cpu_precision.sh --smoke     # checks the harness (tiny data, 1 round)
#
# Writes bench/results/<date>-cpu-precision/{results.jsonl,table.md,cpu.txt,logs/}.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

smoke=0
[[ "${1:-}" == "--smoke" ]] && smoke=1
if ((smoke)); then
  rounds=1 samples="64:200 128:100" ns="1" steps=3
else
  # Fewer images at 128 px, where a step costs four times as much.
  rounds="${ROUNDS:-3}" samples="64:0.05 128:0.02" ns="1 2" steps=10
fi
sac="$root/target/release/sac"
py="$root/.venv/bin/python"
torchrun="$root/.venv/bin/torchrun"
[[ -x "$sac" ]] || cargo build --release --quiet

out="$root/bench/results/$(date -u +%Y%m%dT%H%M%SZ)-cpu-precision"
((smoke)) && out="$out-smoke"
mkdir -p "$out/logs"
results="$out/results.jsonl"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { printf '\033[1mbench:\033[0m %s\n' "$*" >&2; }
{ grep -m1 'model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; } >"$out/cpu.txt" || true

step_limit=$((smoke ? 300 : 1200))
step() { # step LOG COMMAND...: runs COMMAND with stderr to LOG, bounded in time
  local logf=$1 rc=0
  shift
  timeout --kill-after=15 "$step_limit" "$@" 2>"$logf" || rc=$?
  if ((rc)); then
    log "FAILED (exit $rc): $*"
    tail -n 30 "$logf" >&2
    exit 1
  fi
}

for spec in $samples; do
  side=${spec%%:*} sample=${spec#*:}
  mkdir -p "$work/$side"
  cat >"$work/$side/config.toml" <<EOF2
[paths]
data_dir = "data"
checkpoint_dir = "checkpoints"
[dataset]
format = "idx"
source = "/usr/share/datasets/fashion-mnist"
sample = $sample
seed = 0
[image]
width = $side
height = $side
[model]
name = "resnet18"
[train]
epochs = 1
batch_size = 64
optimizer = "adam"
lr = 4e-4
validate = false
threads = 1
cache = true
EOF2
  step "$out/logs/create-dataset-$side.log" "$sac" --config "$work/$side/config.toml" -q create-dataset
done

sac_train() { # sac_train SIDE N PRECISION ROUND
  local side=$1 n=$2 precision=$3 logf="$out/logs/sac-$1-n$2-$3-r$4.log"
  rm -rf "$work/$side/checkpoints"
  step "$logf" mpiexec -n "$n" "$sac" --config "$work/$side/config.toml" train \
    --set "train.precision=\"$precision\""
  "$py" - "$work/$side/checkpoints/resnet18/state.json" "$side" "$n" "$precision" "$4" <<'EOF2' >>"$results"
import json, sys
state, side, n, asked, rnd = json.load(open(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
h = state["history"][-1]
print(json.dumps({"what": "train", "impl": "sac", "asked": asked, "precision": h["precision"], "size": side,
                  "n": n, "round": rnd, "images_per_second": h["images_per_second"]}))
EOF2
}

ddp_train() { # ddp_train SIDE N PRECISION ROUND [--channels-last]
  local side=$1 n=$2 precision=$3 rnd=$4 logf="$out/logs/ddp-$1-n$2-$3${5:+-cl}-r$4.log"
  OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo step "$logf" "$torchrun" --standalone --nproc_per_node "$n" \
    bench/baselines.py ddp --data "$work/$side/data" --size "$side" --precision "$precision" ${5:-} \
    --timeout "$step_limit" >"$work/ddp.out"
  grep '^{' "$work/ddp.out" | "$py" -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$rnd" >>"$results"
}

log "results in $out"
for round in $(seq 1 "$rounds"); do
  for spec in $samples; do
    side=${spec%%:*}
    log "round $round/$rounds, $side px"
    for args in "f32" "bf16 --channels-last"; do
      # shellcheck disable=SC2086
      step "$out/logs/limit-$side-r$round.log" "$py" bench/baselines.py compute --no-step --size "$side" \
        --steps "$steps" --precision $args |
        "$py" -c 'import json,sys; r=json.loads(sys.stdin.read()); r["round"]=int(sys.argv[1]); print(json.dumps(r))' "$round" >>"$results"
    done
    for n in $ns; do
      sac_train "$side" "$n" f32 "$round"
      sac_train "$side" "$n" auto "$round"
      ddp_train "$side" "$n" f32 "$round"
      ddp_train "$side" "$n" bf16 "$round" --channels-last
    done
  done
done
"$py" bench/cpu_precision_table.py "$results" "$out/cpu.txt" | tee "$out/table.md"
