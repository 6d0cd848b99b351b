#!/usr/bin/env bash
# Herbarium 2021 at its real class count on this machine: generate a Herbarium-shaped set
# (bench/herbarium_gen.py: 64,500 classes, ~200,000 tiny JPEGs, an unlabeled test set), then run
#   sac create-dataset (sample 1.0, stratified, predict_source = the test set)
#   mpiexec -n 4 sac train --epochs 1      (32x32)
#   mpiexec -n 4 sac evaluate
#   mpiexec -n 4 sac evaluate --split predict
# and print a table of each step's wall time and every rank's peak RSS (from sac's own log lines).
#
# Usage: bench/herbarium.sh [WORK_DIR]        (default target/herbarium; the generated set is kept
#        and reused). Knobs: CLASSES (64500), IMAGES (200000), SIZE (32x32), RANKS (4), EPOCHS (1).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$root/target/herbarium}
classes=${CLASSES:-64500}
images=${IMAGES:-200000}
size=${SIZE:-32x32}
ranks=${RANKS:-4}
epochs=${EPOCHS:-1}
sac=$root/target/release/sac
python=$root/.venv/bin/python
[[ -x $sac ]] || { echo "build sac first: cargo build --release" >&2; exit 2; }

mkdir -p "$work"
gen=$work/herbarium-$classes-$images-$size
if [[ ! -d $gen ]]; then
  echo "== generating $gen" >&2
  "$python" "$root/bench/herbarium_gen.py" "$gen" --classes "$classes" --images "$images" --size "$size"
fi

run=$work/run
rm -rf "$run"
mkdir -p "$run"
config=$run/config.toml
cat >"$config" <<EOF
[paths]
data_dir = "data"
checkpoint_dir = "checkpoints"
output_dir = "output"
log_file = "sac.log"

[dataset]
format = "coco"
source = "$gen/train"
predict_source = "$gen/test/metadata.json"
sample = 1.0
stratify = true
test_fraction = 0.2
place = "hardlink"

[image]
width = ${size%x*}
height = ${size#*x}

[train]
epochs = $epochs
batch_size = 64
cache = "auto"

[evaluate]
batch_size = 64
EOF

table=$run/herbarium.md
printf '| step | wall time | peak RSS per rank (MiB) |\n|---|---|---|\n' >"$table"

# step NAME COMMAND...: runs it, then reads the peak-memory lines it added to sac.log.
step() {
  local name=$1
  shift
  local before=0
  [[ -f $run/sac.log ]] && before=$(wc -l <"$run/sac.log")
  echo "== $name" >&2
  local t0 t1
  t0=$(date +%s.%N)
  "$@"
  t1=$(date +%s.%N)
  local rss
  # rank 0's last line: "done: …; peak memory per rank 668, 462 MiB, …" (or "peak memory 670 MiB")
  rss=$(tail -n +"$((before + 1))" "$run/sac.log" |
    sed -n 's/.*done: .*peak memory \(per rank \)\{0,1\}\([0-9, ]*\) MiB.*/\2/p' | tail -n 1 |
    tr ',' '\n' | awk '{printf "%s%s: %s", (NR > 1 ? ", " : ""), "rank " (NR - 1), $1}')
  printf '| `%s` | %.0f s | %s |\n' "$name" "$(awk "BEGIN{print $t1 - $t0}")" "${rss:-?}" >>"$table"
}

cd "$run"
step "sac create-dataset" "$sac" --config "$config" create-dataset
step "mpiexec -n $ranks sac train --epochs $epochs" mpiexec -n "$ranks" "$sac" --config "$config" train
step "mpiexec -n $ranks sac evaluate" mpiexec -n "$ranks" "$sac" --config "$config" evaluate
step "mpiexec -n $ranks sac evaluate --split predict" \
  mpiexec -n "$ranks" "$sac" --config "$config" evaluate --split predict

echo >&2
cat "$table"
echo "log: $run/sac.log; outputs: $run/output" >&2
