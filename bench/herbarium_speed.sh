#!/usr/bin/env bash
# Speed figures for Herbarium-sized work on this machine (BENCHMARKS.md, "herbarium-shaped"):
#  1. train images/s on full-size sheets (1000x680 JPEGs) at 128x128 with the decode cache off:
#     loader thread (train.prefetch = 2) against none (prefetch = 0), 1 rank of 1 torch thread and
#     2 ranks of 1 thread, interleaved rounds;
#  2. evaluate images/s on the same kind of JPEGs with 1 and with 2 decode threads (4 ranks, and 1
#     rank whose stages are threads), the predict split at 32x32 so that decoding, not the
#     predictor, is the bottleneck;
#  3. the 64,500-class head: gradient exchange and fused Adam step, ms per step, at N = 1, 2, 4
#     (`sac mpi-check --classes 64500`).
# Usage: bench/herbarium_speed.sh [WORK_DIR] (default target/herbarium-speed). ROUNDS (3);
# PARTS ("train eval head": any of them).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=${1:-$root/target/herbarium-speed}
rounds=${ROUNDS:-3}
sac=$root/target/release/sac
python=$root/.venv/bin/python
[[ -x $sac ]] || { echo "build sac first: cargo build --release" >&2; exit 2; }
mkdir -p "$work"
gen=$work/sheets
if [[ ! -d $gen ]]; then
  "$python" "$root/bench/herbarium_gen.py" "$gen" --classes 40 --images 640 --test-images 2000 --size 1000x680
fi
config=$work/config.toml
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
place = "hardlink"

[image]
width = 128
height = 128

[train]
epochs = 1
batch_size = 32
threads = 1
cache = false
validate = false

[evaluate]
batch_size = 32
EOF
cd "$work"
[[ -d data ]] || "$sac" -q --config "$config" create-dataset

# images/s of the last epoch in state.json
rate() { "$python" -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["history"][-1]["images_per_second"], 1))' \
  checkpoints/resnet18/state.json; }

parts=${PARTS:-train eval head}
if [[ $parts == *train* ]]; then
echo "## train, 1000x680 JPEGs at 128x128, cache off, batch 32 per rank, 1 torch thread per rank"
for round in $(seq "$rounds"); do
  for ranks in 1 2; do
    for ahead in 0 2; do
      mpiexec -n "$ranks" "$sac" -q --config "$config" train --overwrite --set train.prefetch=$ahead >/dev/null
      echo "round $round: ranks $ranks prefetch $ahead: $(rate) images/s"
    done
  done
done

fi

if [[ $parts == *eval* ]]; then
echo "## evaluate --split predict, the same kind of JPEGs ($(($(wc -l <data/predict.csv) - 1)) images) at 32x32, batch 32"
for round in $(seq "$rounds"); do
  for ranks in 4 1; do
    for threads in 1 2; do
      summary=$(mpiexec -n "$ranks" "$sac" --config "$config" evaluate --split predict \
        --set evaluate.decode_threads=$threads --set image.width=32 --set image.height=32 2>/dev/null)
      SUMMARY=$summary "$python" - "$ranks" "$threads" "$round" <<'PY'
import os, re, sys
text = os.environ["SUMMARY"]
rate = re.search(r"([0-9.]+) images/s", text).group(1)
busy = dict((m[0], (m[1], m[2])) for m in re.findall(r"^  (\w+) .*busy +([0-9.]+) %  \(([0-9]+) images per busy second\)", text, re.M))
d, p = busy["decode"], busy["predict"]
print(f"round {sys.argv[3]}: ranks {sys.argv[1]} decode threads {sys.argv[2]}: {rate} images/s; "
      f"decode busy {d[0]} % ({d[1]} images per busy second), predict busy {p[0]} %")
PY
    done
  done
done

fi

[[ $parts == *head* ]] || exit 0
echo "## the 64,500-class head (resnet18): exchange and optimizer"
for ranks in 1 2 4; do
  mpiexec -n "$ranks" "$sac" -q mpi-check --classes 64500 --reps 5
done
for floats in 1048576 16777216; do
  echo "SAC_BUCKET_FLOATS=$floats, 4 ranks:"
  SAC_BUCKET_FLOATS=$floats mpiexec -n 4 "$sac" -q mpi-check --classes 64500 --reps 5 | grep gradients
done
