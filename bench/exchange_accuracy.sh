#!/usr/bin/env bash
# What the bfloat16 gradient exchange (train.exchange = "bf16") does to accuracy (BENCHMARKS.md,
# "bfloat16 exchange"): the default config's training (resnet18 from scratch, Fashion-MNIST 10 %
# sample with seed 0, 64x64, Adam 4e-4, batch 64 per rank), run once with the gradients summed as
# f32 and once as bfloat16, same seed, same ranks, validated after every epoch. The rounding is
# the only difference: with f32 the runs would be identical bit for bit.
#
#   bench/exchange_accuracy.sh                         # 4 ranks, 3 epochs, seed 0 (~8 min on 2 cores)
#   bench/exchange_accuracy.sh --ranks 4 --epochs 3 --seeds "0 1"
#
# Writes bench/results/exchange-accuracy-<timestamp>.{jsonl,md}: per run and epoch the
# validation top-1, top-5 and loss, and the table (also printed). Needs target/release/sac and
# MPI (scripts/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ranks=4 epochs=3 seeds=0
command_line=$(echo "bench/exchange_accuracy.sh $*" | sed "s/ *$//")
while (($#)); do
  case $1 in
    --ranks) ranks=${2:?}; shift 2 ;;
    --epochs) epochs=${2:?}; shift 2 ;;
    --seeds) seeds=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "exchange_accuracy.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
sac=$root/target/release/sac
[[ -x $sac ]] || { echo "exchange_accuracy.sh: $sac is missing: build sac first (cargo build --release)" >&2; exit 2; }
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=$root/bench/results/exchange-accuracy-$stamp
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { printf '\033[1mexchange_accuracy:\033[0m %s\n' "$*" >&2; }

cp config.toml "$work/config.toml"
(cd "$work" && "$sac" -q create-dataset --sample 0.1 >"$work/create-dataset.log" 2>&1)
: >"$out.jsonl"
for seed in $seeds; do
  for ex in f32 bf16; do
    log "seed $seed, exchange $ex: mpiexec -n $ranks sac train --epochs $epochs"
    ck=$work/ck-$seed-$ex
    (cd "$work" && timeout 3600 mpiexec -n "$ranks" "$sac" -c config.toml train --epochs "$epochs" \
      --set "dataset.seed=$seed" --set "train.exchange=\"$ex\"" --set "paths.checkpoint_dir=$ck" \
      >"$work/train-$seed-$ex.log" 2>&1) ||
      { log "the run failed:"; tail -5 "$work/train-$seed-$ex.log" >&2; exit 1; }
    python3 - "$ck/resnet18/state.json" "$seed" "$ex" "$ranks" "$(git rev-parse --short HEAD)" >>"$out.jsonl" <<'PYEOF'
import json, sys
path, seed, ex, ranks, commit = sys.argv[1:]
for h in json.load(open(path))["history"]:
    print(json.dumps({"seed": int(seed), "exchange": ex, "ranks": int(ranks), "commit": commit, "epoch": h["epoch"],
                      "top1": h["top1"], "top5": h["top5"], "val_loss": h["val_loss"], "train_loss": h["train_loss"]}))
PYEOF
  done
done
python3 - "$out.jsonl" "$command_line" <<'PYEOF' | tee "$out.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"Command: `{sys.argv[2]}`; {rows[0]['ranks']} ranks, sac {rows[0]['commit']}\n")
print("| seed | epoch | top-1 f32 | top-1 bf16 | bf16 − f32 (points) | val loss f32 | val loss bf16 | train loss f32 | train loss bf16 |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
key = lambda r: (r["seed"], r["epoch"])
f32 = {key(r): r for r in rows if r["exchange"] == "f32"}
bf = {key(r): r for r in rows if r["exchange"] == "bf16"}
for k in sorted(f32):
    a, b = f32[k], bf.get(k)
    if b is None:
        continue
    pct = lambda x: 100 * x if x <= 1 else x
    print(f"| {k[0]} | {k[1]} | {pct(a['top1']):.2f} % | {pct(b['top1']):.2f} % | {pct(b['top1']) - pct(a['top1']):+.2f} | "
          f"{a['val_loss']:.4f} | {b['val_loss']:.4f} | {a['train_loss']:.4f} | {b['train_loss']:.4f} |")
PYEOF
log "results: $out.jsonl, $out.md"
