#!/usr/bin/env bash
# What bfloat16 does to accuracy (BENCHMARKS.md): the gradient exchange as bfloat16
# (train.exchange = "bf16", the default --vary exchange) or the arithmetic as bf16 autocast
# (train.precision = "bf16", --vary precision). The default config's training (resnet18 from
# scratch, Fashion-MNIST 10 % sample with seed 0, 64x64, Adam 4e-4, batch 64 per rank), run once
# with the key at "f32" and once at "bf16", same seed, same ranks, validated after every epoch.
# The rounding is the only difference: with f32 the runs would be identical bit for bit.
#
#   bench/exchange_accuracy.sh                         # 4 ranks, 3 epochs, seed 0 (~8 min on 2 cores)
#   bench/exchange_accuracy.sh --ranks 4 --epochs 3 --seeds "0 1"
#   bench/exchange_accuracy.sh --vary precision --ranks 2 --epochs 6 --seeds "0 1 2"
#
# Writes bench/results/<key>-accuracy-<timestamp>.{jsonl,md}: per run and epoch the
# validation top-1, top-5 and loss, and the table (also printed). Needs target/release/sac and
# MPI (scripts/setup.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
ranks=4 epochs=3 seeds=0 vary=exchange
command_line=$(echo "bench/exchange_accuracy.sh $*" | sed "s/ *$//")
while (($#)); do
  case $1 in
    --ranks) ranks=${2:?}; shift 2 ;;
    --epochs) epochs=${2:?}; shift 2 ;;
    --seeds) seeds=${2:?}; shift 2 ;;
    --vary) vary=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "exchange_accuracy.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ $vary == exchange || $vary == precision ]] ||
  { echo "exchange_accuracy.sh: --vary takes exchange or precision, not $vary" >&2; exit 2; }
sac=$root/target/release/sac
[[ -x $sac ]] || { echo "exchange_accuracy.sh: $sac is missing: build sac first (cargo build --release)" >&2; exit 2; }
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=$root/bench/results/$vary-accuracy-$stamp
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { printf '\033[1mexchange_accuracy:\033[0m %s\n' "$*" >&2; }

cp config.toml "$work/config.toml"
(cd "$work" && "$sac" -q create-dataset --sample 0.1 >"$work/create-dataset.log" 2>&1)
: >"$out.jsonl"
for seed in $seeds; do
  for ex in f32 bf16; do
    log "seed $seed, $vary $ex: mpiexec -n $ranks sac train --epochs $epochs"
    ck=$work/ck-$seed-$ex
    (cd "$work" && timeout 3600 mpiexec -n "$ranks" "$sac" -c config.toml train --epochs "$epochs" \
      --set "dataset.seed=$seed" --set "train.$vary=\"$ex\"" --set "paths.checkpoint_dir=$ck" \
      >"$work/train-$seed-$ex.log" 2>&1) ||
      { log "the run failed:"; tail -5 "$work/train-$seed-$ex.log" >&2; exit 1; }
    python3 - "$ck/resnet18/state.json" "$seed" "$ex" "$ranks" "$(git rev-parse --short HEAD)" "$vary" >>"$out.jsonl" <<'PYEOF'
import json, sys
path, seed, ex, ranks, commit, vary = sys.argv[1:]
for h in json.load(open(path))["history"]:
    print(json.dumps({"seed": int(seed), vary: ex, "ranks": int(ranks), "commit": commit, "epoch": h["epoch"],
                      "top1": h["top1"], "top5": h["top5"], "val_loss": h["val_loss"], "train_loss": h["train_loss"]}))
PYEOF
  done
  if [[ $vary == precision ]]; then
    # Evaluation of the f32-trained weights in f32 and in bf16: how many predictions agree.
    for p in f32 bf16; do
      (cd "$work" && timeout 1800 mpiexec -n 1 "$sac" -c config.toml evaluate \
        --set "dataset.seed=$seed" --set "paths.checkpoint_dir=$work/ck-$seed-f32" \
        --set "paths.output_dir=$work/eval-$seed-$p" --set "evaluate.precision=\"$p\"" \
        >"$work/eval-$seed-$p.log" 2>&1) || { log "evaluate failed:"; tail -5 "$work/eval-$seed-$p.log" >&2; exit 1; }
    done
    python3 - "$work/eval-$seed-f32/predictions.csv" "$work/eval-$seed-bf16/predictions.csv" "$seed" \
      >>"$out.agree.jsonl" <<'PYEOF'
import csv, json, sys
a, b = ([r["Predicted"] for r in csv.DictReader(open(p))] for p in sys.argv[1:3])
print(json.dumps({"seed": int(sys.argv[3]), "images": len(a), "agree": sum(x == y for x, y in zip(a, b))}))
PYEOF
  fi
done
python3 - "$out.jsonl" "$command_line" "$vary" <<'PYEOF' | tee "$out.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
vary = sys.argv[3]
print(f"Command: `{sys.argv[2]}`; {rows[0]['ranks']} ranks, sac {rows[0]['commit']}\n")
print("| seed | epoch | top-1 f32 | top-1 bf16 | bf16 − f32 (points) | val loss f32 | val loss bf16 | train loss f32 | train loss bf16 |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
key = lambda r: (r["seed"], r["epoch"])
f32 = {key(r): r for r in rows if r[vary] == "f32"}
bf = {key(r): r for r in rows if r[vary] == "bf16"}
for k in sorted(f32):
    a, b = f32[k], bf.get(k)
    if b is None:
        continue
    pct = lambda x: 100 * x if x <= 1 else x
    print(f"| {k[0]} | {k[1]} | {pct(a['top1']):.2f} % | {pct(b['top1']):.2f} % | {pct(b['top1']) - pct(a['top1']):+.2f} | "
          f"{a['val_loss']:.4f} | {b['val_loss']:.4f} | {a['train_loss']:.4f} | {b['train_loss']:.4f} |")
last = max(k[1] for k in f32)
ends = [(f32[k], bf[k]) for k in sorted(f32) if k[1] == last and k in bf]
if len(ends) > 1:
    a = [100 * x["top1"] for x, _ in ends]
    b = [100 * y["top1"] for _, y in ends]
    print(f"\nLast epoch ({last}), {len(ends)} seeds: mean top-1 f32 {statistics.mean(a):.2f} % "
          f"(spread {min(a):.2f}–{max(a):.2f}), bf16 {statistics.mean(b):.2f} % (spread {min(b):.2f}–{max(b):.2f}); "
          f"bf16 − f32 {statistics.mean(b) - statistics.mean(a):+.2f} points")
PYEOF
if [[ -s $out.agree.jsonl ]]; then
  python3 - "$out.agree.jsonl" <<'PYEOF' | tee -a "$out.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\nEvaluation of the f32-trained weights in bf16 against f32 (`evaluate.precision`): " + "; ".join(
    f"seed {r['seed']}: {r['agree']} of {r['images']} predictions agree ({100 * r['agree'] / r['images']:.2f} %)" for r in rows))
PYEOF
fi
log "results: $out.jsonl, $out.md"
