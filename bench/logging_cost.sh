#!/usr/bin/env bash
# What watching a run costs (BENCHMARKS.md, "observability"): training images/s with progress
# reporting off (train.log_every = 0: no progress lines, metrics.jsonl only per epoch, no timeline)
# against everything on at its most frequent (a progress line and a metrics.jsonl interval every
# second, 30x the default, and a timeline of 100 steps), on the bench-fmnist workload (Fashion-MNIST
# 10 %, resnet18 64x64, batch 64 per rank, 1 torch thread per rank, decode cache on, no
# validation), 2 ranks, one epoch per run. Rounds run off/on/on/off so that drift of the machine's
# speed within a round cancels; the figure is the median of the per-round ratios. That end-to-end
# ratio is only as exact as the machine's run-to-run noise (several % here), so the script also
# times the reporting code itself (benches/observability.rs: ns per step, per progress line, per
# timeline span) and divides its worst case per step (one line and 12 open spans every step) by the
# step time measured above.
# Usage: bench/logging_cost.sh [WORK_DIR] (default target/logging-cost). ROUNDS (4), RANKS (2).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$root/target/logging-cost}
rounds=${ROUNDS:-4}
ranks=${RANKS:-2}
sac=$root/target/release/sac
python=$root/.venv/bin/python
[[ -x $sac ]] || { echo "build sac first: cargo build --release" >&2; exit 2; }
mkdir -p "$work"
config=$work/config.toml
cat >"$config" <<EOF
[paths]
data_dir = "data"
checkpoint_dir = "checkpoints"
log_file = "sac.log"

[dataset]
format = "idx"
source = "/usr/share/datasets/fashion-mnist"
sample = 0.1
seed = 0

[image]
width = 64
height = 64

[train]
epochs = 1
batch_size = 64
threads = 1
cache = true
validate = false
EOF
cd "$work"
[[ -d data ]] || "$sac" -q --config "$config" create-dataset

# run NAME SAC_ARGS...: one epoch; prints images/s (from state.json)
run() {
  local name=$1
  shift
  rm -rf checkpoints
  mpiexec -n "$ranks" "$sac" --config "$config" train "$@" 2>"$work/$name.log"
  "$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["history"][-1]["images_per_second"])' \
    checkpoints/resnet18/state.json
}
off=(--set train.log_every=0)
on=(--set train.log_every=1 --set timeline.steps=100 --timeline "$work/trace.json")

results=$work/results.txt
: >"$results"
for r in $(seq 1 "$rounds"); do
  a=$(run off "${off[@]}")
  b=$(run on "${on[@]}")
  c=$(run on "${on[@]}")
  d=$(run off "${off[@]}")
  echo "$r $a $b $c $d" | tee -a "$results" >&2
done
lines=$(grep -c ' step ' "$work/on.log" || true)
micro=$(cd "$root" && cargo bench -q --bench observability 2>/dev/null | tail -n 1)
"$python" - "$results" "$lines" "$micro" "$ranks" <<'EOF'
import json
import statistics, sys
rows = [list(map(float, l.split()[1:])) for l in open(sys.argv[1]) if l.strip()]
ratios = [(r[1] + r[2]) / (r[0] + r[3]) for r in rows]
off = [x for r in rows for x in (r[0], r[3])]
on = [x for r in rows for x in (r[1], r[2])]
print(f"rounds: {len(rows)}; progress lines in one 'on' run: {sys.argv[2]}")
print(f"off: median {statistics.median(off):.1f} images/s (min {min(off):.1f}, max {max(off):.1f})")
print(f"on:  median {statistics.median(on):.1f} images/s (min {min(on):.1f}, max {max(on):.1f})")
print(f"on / off per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")
m = json.loads(sys.argv[3])
step_s = 64 * int(sys.argv[4]) / statistics.median(off)
worst = m["step_ns"] + m["interval_line_ns"] + 12 * m["span_open_ns"]
print(f"reporting code: {m['step_ns']:.0f} ns per step, {m['interval_line_ns'] / 1000:.1f} us per progress line "
      f"+ metrics.jsonl interval, {m['span_closed_ns']:.1f} ns per span outside the window, {m['span_open_ns']:.0f} ns inside")
print(f"worst case per step {worst / 1000:.1f} us against a step of {step_s:.2f} s: {100 * worst * 1e-9 / step_s:.4f} %")
EOF
