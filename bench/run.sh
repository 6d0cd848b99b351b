#!/usr/bin/env bash
# The "bench-fmnist" workload (../shared/DESIGN.md) for sac and its baselines, interleaved round by
# round so that machine drift hits all of them alike; prints one table (median, min–max).
#
#   bench/run.sh            # the full benchmark: 3 rounds (about 25 minutes on 2 cores)
#   bench/run.sh --smoke    # checks that the harness works, not speeds (tiny data, 1 round)
#   ROUNDS=5 bench/run.sh   # more rounds
#
# Writes bench/results/<date>/{results.jsonl,table.md,logs/}. Baselines: bench/baselines.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

smoke=0
[[ "${1:-}" == "--smoke" ]] && smoke=1
if ((smoke)); then
  rounds=1 sample=300 train_ns="1 2" eval_ns="1 4" jpeg_count=5 mpi_ns="2"
else
  rounds="${ROUNDS:-3}" sample=0.1 train_ns="1 2 4" eval_ns="1 4 5 6" jpeg_count=100 mpi_ns="2 4"
fi

bash scripts/setup.sh >&2
# The smoke run (in the test command, after `cargo test` built target/release/sac) uses the binary
# as it is: a plain `cargo build` would rebuild dependencies whose features differ without the
# dev-dependencies. The full run always builds.
if ((!smoke)) || [[ ! -x target/release/sac ]]; then
  cargo build --release --quiet
fi
sac="$root/target/release/sac"
py="$root/.venv/bin/python"
torchrun="$root/.venv/bin/torchrun"

out="$root/bench/results/$(date -u +%Y%m%dT%H%M%SZ)"
if ((smoke)); then out="$out-smoke"; fi
mkdir -p "$out/logs"
results="$out/results.jsonl"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log() { printf '\033[1mbench:\033[0m %s\n' "$*" >&2; }

# Every step has a time bound, so a hung step fails the run (naming the step and showing its
# log) instead of holding it. `timeout` signals the step's whole process group, mpiexec's ranks too.
step_limit=$((smoke ? 300 : 1800))
step() { # step LOG COMMAND...: empties LOG, then runs COMMAND with stderr appended to it
  local logf=$1 rc=0
  shift
  : >"$logf"
  timeout --kill-after=15 "$step_limit" "$@" 2>>"$logf" || rc=$?
  if ((rc)); then
    if ((rc == 124 || rc == 137)); then
      log "FAILED: no end after ${step_limit} s: $*"
    else
      log "FAILED (exit $rc): $*"
    fi
    log "last lines of $logf:"
    tail -n 40 "$logf" >&2
    exit 1
  fi
}

# The workload: Fashion-MNIST 70k pooled, sample 0.1, seed 0; 64x64; resnet18 from scratch;
# batch 64 per rank; Adam 4e-4; one torch thread per rank; one epoch.
cat >"$work/config.toml" <<EOF
[paths]
data_dir = "data"
checkpoint_dir = "checkpoints"
output_dir = "output"
log_file = "sac.log"
[dataset]
format = "idx"
source = "/usr/share/datasets/fashion-mnist"
sample = $sample
seed = 0
[image]
width = 64
height = 64
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
EOF
step "$out/logs/create-dataset.log" "$sac" --config "$work/config.toml" -q create-dataset
data="$work/data"

# sac train at N ranks: images/s from state.json, peak RSS and CPU per rank from the log.
sac_train() {
  local n=$1 logf="$out/logs/sac-train-n$1-r$2.log"
  rm -rf "$work/checkpoints"
  step "$logf" mpiexec -n "$n" "$sac" --config "$work/config.toml" train >>"$logf"
  "$py" - "$work/checkpoints/resnet18/state.json" "$logf" "$n" <<'EOF' >>"$results"
import json, re, sys
state, log, n = json.load(open(sys.argv[1])), open(sys.argv[2]).read(), int(sys.argv[3])
# "peak memory 670 MiB, CPU 10.2 s" (one rank) or "peak memory per rank 668, 462 MiB, CPU per rank 6.8, 6.2 s"
m = re.search(r"peak memory (?:per rank )?([\d, ]+) MiB, CPU (?:per rank )?([\d., ]+) s", log)
ranks = list(zip(m.group(1).split(", "), m.group(2).split(", "))) if m else []
h = state["history"][-1]
images = h["images_per_second"] * h["seconds"]
print(json.dumps({"what": "train", "impl": "sac", "n": n, "images_per_second": h["images_per_second"],
                  "peak_rss_mib": [float(r) for r, _ in ranks],
                  "cpu_seconds_per_image": sum(float(c) for _, c in ranks) / max(images, 1)}))
EOF
}

ddp_train() {
  local n=$1 logf="$out/logs/ddp-train-n$1-r$2.log"
  OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo step "$logf" "$torchrun" --standalone --nproc_per_node "$n" \
    bench/baselines.py ddp --data "$data" --timeout "$step_limit" >"$work/ddp.out"
  grep '^{' "$work/ddp.out" >>"$results"
}

sac_eval() {
  local n=$1 logf="$out/logs/sac-eval-n$1-r$2.log"
  step "$logf" mpiexec -n "$n" "$sac" --config "$work/config.toml" --set train.threads=0 evaluate >>"$logf"
  "$py" - "$work/output/metrics.json" "$n" <<'EOF' >>"$results"
import json, sys
m, n = json.load(open(sys.argv[1])), int(sys.argv[2])
stages = {k: round(v["busy_share"], 3) for k, v in m["stages"].items()}
print(json.dumps({"what": "evaluate", "impl": "sac", "n": n, "images_per_second": m["images_per_second"],
                  "cpu_seconds_per_image": m["cpu_seconds_per_image"], "top1": m["top1"], "busy": stages}))
EOF
}

log "results in $out"
step "$out/logs/jpegs.log" "$py" bench/baselines.py jpegs --dir "$work/jpegs" --count "$jpeg_count"
for round in $(seq 1 "$rounds"); do
  log "round $round/$rounds"
  step "$out/logs/compute-r$round.log" "$py" bench/baselines.py compute --no-step --steps $((smoke ? 3 : 20)) >>"$results"
  for n in $train_ns; do
    log "  train n=$n: sac, then DDP"
    sac_train "$n" "$round"
    ddp_train "$n" "$round"
  done
  for n in $mpi_ns; do
    log "  gradient exchange n=$n"
    step "$out/logs/mpi-check-n$n-r$round.log" mpiexec -n "$n" "$sac" mpi-check --reps $((smoke ? 2 : 10)) -q \
      >"$work/mpi-check.out"
    "$py" -c '
import json, re, sys
text = sys.stdin.read()
m = re.search(r"fused ([\d.]+) \(allreduce alone ([\d.]+)\), one allreduce per tensor ([\d.]+)", text)
print(json.dumps({"what": "allreduce", "impl": "sac", "n": int(sys.argv[1]), "fused_ms": float(m[1]),
                  "raw_ms": float(m[2]), "per_tensor_ms": float(m[3])}))' "$n" <"$work/mpi-check.out" >>"$results"
  done
  for n in $eval_ns; do
    log "  evaluate n=$n"
    sac_eval "$n" "$round"
  done
  log "  evaluate: PyTorch baseline"
  step "$out/logs/infer-r$round.log" "$py" bench/baselines.py infer --data "$data" --batch 32 \
    --threads "$(nproc)" --checkpoint "$work/checkpoints/resnet18/model.safetensors" >>"$results"
  log "  decode + resize of 1000x680 JPEGs"
  step "$out/logs/decode-r$round.log" "$py" bench/baselines.py decode --dir "$work/jpegs" >>"$results"
  if ((!smoke)); then # the smoke run skips building the bench profile; a unit test covers the loader
    SAC_BENCH_JPEGS="$work/jpegs" step "$out/logs/decode-sac-r$round.log" cargo bench --quiet --bench decode \
      >"$work/decode.out"
    grep '^{' "$work/decode.out" >>"$results"
  fi
done

"$py" bench/table.py "$results" | tee "$out/table.md"
