#!/usr/bin/env bash
# Accuracy of sac's training recipes against PyTorch's (BENCHMARKS.md, "sac vs PyTorch, plain and
# full recipe, 3 seeds"): resnet18 from scratch on the project's default data (the data dir that
# `sac create-dataset` makes from the default config: Fashion-MNIST, a 10 % sample with seed 0,
# 5,600 train / 1,400 test images, 64x64), trained by sac (mpiexec, RANKS ranks x 1 torch thread,
# batch 64 per rank) and by bench/recipe_torch.py as PyTorch DDP (torchrun, RANKS processes over
# gloo x 1 thread, batch 64 per process: the same global batch, and batch-norm over each rank's 64
# images in both), both on the SAME data dir, with the same recipe and seeds. The test top-1 after
# the last epoch of every run goes to the table.
#
#   bench/recipe.sh                                   # 15 epochs, seeds 0 1 2, 2 ranks
#   bench/recipe.sh --epochs 15 --seeds "0 1 2" --ranks 2
#   bench/recipe.sh --resume bench/results/recipe-<timestamp>.json   # add the runs it lacks
#   bench/recipe.sh --frameworks sac --recipes full --precisions "f32 bf16"   # bf16 vs f32 accuracy
#   bench/recipe.sh --smoke      # plumbing check: 1 epoch, the first seed only, a 1 % sample (~1 min)
#   KEEP=1 bench/recipe.sh ...   # keep the work dir (data, configs, logs, per-run JSON)
#
# --resume FILE continues an earlier (e.g. interrupted) benchmark: the runs already in FILE are
# kept and skipped, the missing ones are run and appended to FILE, and the table is made from all
# of them (its .md is rewritten next to FILE). Epochs, ranks and sample must be those of FILE's
# runs (checked); the commit of every run is kept, and the table names them all.
#
# Recipes (each run by both frameworks):
#   plain: sac's defaults = recipe_torch.py's defaults: Adam, lr 4e-4, constant lr, no weight
#          decay, no augmentation, images stretched to 64x64.
#   full:  torchvision's reference family ("SGD + cosine + warmup + weight decay + label smoothing
#          + random resized crop + flip"): SGD lr 0.1 x global batch / 256 (lr_scaling linear,
#          Goyal et al.'s rule: 0.05 at 2 ranks; at 0.1 for a global batch of 256 the first epoch
#          already swings wildly on this data, in sac and PyTorch alike), momentum 0.9, Nesterov, weight decay 1e-4 (0 on batch-norm parameters
#          and biases), cosine schedule per step after 1 warmup epoch from 0.01 x lr, label smoothing
#          0.1, RandomResizedCrop(64, scale [0.35, 1], ratio [3/4, 4/3]) + horizontal flip in
#          training, evaluation by resize center_crop (short side 73, centre 64x64).
#          scale [0.35, 1] instead of torchvision's [0.08, 1]: a Fashion-MNIST garment fills most
#          of a 28x28 image, so 8 % crops would often show no recognisable part of it.
#          image.cache_size = 64 makes sac cut its random crops from the whole 28x28 image (its
#          short side is below 64, so it is kept as it is), as torchvision's RandomResizedCrop does;
#          with the default 0 sac would crop from the 64x64 centre-cropped image instead.
#
# Precisions (--precisions, sac only; default f32): each sac run is repeated per precision with
# `--set train.precision=<p>` (f32, bf16 = CPU autocast, auto); validation runs in that precision
# too. PyTorch runs stay f32, once per recipe and seed. Runs of older results without a precision
# are f32 runs.
#
# Seeds: sac's training seed IS dataset.seed (tch::manual_seed(dataset.seed) for the initial
# weights, and dataset.seed for the data order, augmentation and per-epoch torch seeds), and
# create-dataset's sample is drawn with it too. So the data dir is made ONCE with seed 0, and each
# run trains with `--set dataset.seed=<s>`: create-dataset is not run again, so the data dir stays
# the seed-0 sample for every run and the seed varies the training only. recipe_torch.py gets
# --seed <s>. The seeds do not make the two frameworks' runs alike (different generators); they
# give each framework a sample of runs whose mean and spread are compared.
# Data order: sac deals each rank a fixed shard (every RANKS-th row) and shuffles it per epoch;
# DDP shuffles all rows per epoch and gives each process every RANKS-th of them (DistributedSampler).
# Both are what their users get; both see every image once per epoch.
#
# Writes bench/results/recipe-<timestamp>.json (a list of {framework, recipe, seed, epochs, top1,
# top5, seconds}, rewritten after every run, so a run that fails late keeps the earlier ones) and
# recipe-<timestamp>.md (the table, also printed). --smoke names them recipe-<timestamp>-smoke.*.
# Every run's log is in the work dir; a failing run stops the script, names its log, shows its last
# lines and keeps the work dir. The work dir is removed at the end unless KEEP=1.
#
# Duration (sac at ~110 images/s with 2 ranks at 64x64 on a 2-core machine): about 1 min per sac
# epoch (5,600 training images + validation of 1,400), so ~15 min per sac run of 15 epochs; the
# PyTorch runs take about as long or longer. 2 recipes x 2 frameworks x 3 seeds = 12 runs: ~3-4 h.
# It may be split over sittings: stop it (its JSON keeps every finished run), then --resume.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

usage() { sed -n '11,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
command_line=bench/recipe.sh # for the table; arguments with spaces in double quotes
for arg in "$@"; do
  [[ $arg == *[[:space:]]* ]] && arg="\"$arg\""
  command_line+=" $arg"
done
epochs=15 seeds="0 1 2" ranks=2 smoke=0 resume= frameworks="sac pytorch" recipes="plain full" precisions=f32
while (($#)); do
  case $1 in
    --epochs) epochs=${2:?--epochs needs a value}; shift 2 ;;
    --seeds) seeds=${2:?--seeds needs a value}; shift 2 ;;
    --ranks) ranks=${2:?--ranks needs a value}; shift 2 ;;
    --frameworks) frameworks=${2:?--frameworks needs a value}; shift 2 ;;
    --recipes) recipes=${2:?--recipes needs a value}; shift 2 ;;
    --precisions) precisions=${2:?--precisions needs a value}; shift 2 ;;
    --smoke) smoke=1; shift ;;
    --resume) resume=${2:?--resume needs a results file}; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "recipe.sh: unknown argument $1" >&2; usage ;;
  esac
done
[[ $epochs =~ ^[1-9][0-9]*$ ]] || { echo "recipe.sh: --epochs must be a positive integer" >&2; exit 2; }
[[ $ranks =~ ^[1-9][0-9]*$ ]] || { echo "recipe.sh: --ranks must be a positive integer" >&2; exit 2; }
read -r -a seed_list <<<"$seeds"
((${#seed_list[@]})) || { echo "recipe.sh: --seeds is empty" >&2; exit 2; }
for s in "${seed_list[@]}"; do
  [[ $s =~ ^[0-9]+$ ]] || { echo "recipe.sh: seed '$s' is not a non-negative integer" >&2; exit 2; }
done
read -r -a framework_list <<<"$frameworks"
read -r -a recipe_list <<<"$recipes"
read -r -a precision_list <<<"$precisions"
for f in "${framework_list[@]}"; do
  [[ $f == sac || $f == pytorch ]] || { echo "recipe.sh: framework '$f' is neither sac nor pytorch" >&2; exit 2; }
done
for r in "${recipe_list[@]}"; do
  [[ $r == plain || $r == full ]] || { echo "recipe.sh: recipe '$r' is neither plain nor full" >&2; exit 2; }
done
for p in "${precision_list[@]}"; do
  [[ $p == f32 || $p == bf16 || $p == auto ]] || { echo "recipe.sh: precision '$p' is not f32, bf16 or auto" >&2; exit 2; }
done
((${#framework_list[@]} && ${#recipe_list[@]} && ${#precision_list[@]})) ||
  { echo "recipe.sh: --frameworks, --recipes and --precisions each need at least one value" >&2; exit 2; }
if ((smoke)); then
  epochs=1 seed_list=("${seed_list[0]}") sample=0.01
else
  sample=0.1
fi

sac=$root/target/release/sac
py=$root/.venv/bin/python
[[ -x $sac ]] || { echo "recipe.sh: $sac is missing: build sac first (cargo build --release)" >&2; exit 2; }
[[ -x $py ]] || { echo "recipe.sh: $py is missing: run scripts/setup.sh first" >&2; exit 2; }
# MPICH's launcher by its own name where Debian has it (Open MPI beside it moves `mpiexec`).
mpiexec=$(command -v mpiexec.mpich || command -v mpiexec) ||
  { echo "recipe.sh: mpiexec is not on PATH" >&2; exit 2; }

stamp=$(date -u +%Y%m%dT%H%M%SZ)
((smoke)) && stamp=$stamp-smoke
mkdir -p "$root/bench/results"
if [[ -n $resume ]]; then
  [[ -f $resume ]] || { echo "recipe.sh: --resume $resume: no such file" >&2; exit 2; }
  results=$(cd "$(dirname "$resume")" && pwd)/$(basename "$resume")
  table_md=${results%.json}.md
  # The earlier runs must be of the same benchmark: epochs, ranks, sample.
  "$py" - "$results" "$epochs" "$ranks" "$sample" <<'EOF' || exit 2
import json, sys
path, epochs, ranks, sample = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
try:
    runs = json.load(open(path))
    assert isinstance(runs, list)
except (OSError, ValueError, AssertionError) as e:
    sys.exit(f"recipe.sh: --resume {path}: not a results file of recipe.sh ({e})")
for r in runs:
    have = (r.get("epochs"), r.get("ranks"), r.get("sample"))
    if have != (epochs, ranks, sample):
        sys.exit(f"recipe.sh: --resume {path}: run {r.get('framework')} {r.get('recipe')} seed {r.get('seed')} "
                 f"has epochs/ranks/sample {have}, this benchmark {(epochs, ranks, sample)}")
EOF
else
  results=$root/bench/results/recipe-$stamp.json
  table_md=$root/bench/results/recipe-$stamp.md
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/sac-recipe.XXXXXX")
ok=0
finish() {
  if ((ok)) && [[ ${KEEP:-0} != 1 ]]; then
    rm -rf "$work"
  else
    echo "recipe.sh: work dir kept: $work" >&2
  fi
}
trap finish EXIT
log() { printf '\033[1mrecipe:\033[0m %s\n' "$*" >&2; }

# step LOG COMMAND...: runs COMMAND with stdout and stderr to LOG, under a time bound (timeout
# signals the step's process group, mpiexec's ranks too); a failure names LOG and ends the script.
step_limit=$((smoke ? 600 : 600 + 600 * epochs))
step() {
  local logf=$1 rc=0
  shift
  echo "+ $*" >"$logf"
  timeout --kill-after=15 "$step_limit" "$@" >>"$logf" 2>&1 || rc=$?
  if ((rc)); then
    if ((rc == 124 || rc == 137)); then
      log "FAILED: no end after $step_limit s: $*"
    else
      log "FAILED (exit $rc): $*"
    fi
    log "log: $logf; its last lines:"
    tail -n 40 "$logf" >&2
    exit 1
  fi
}

# sac's configs: one per recipe, the same [paths] and [dataset] (so one data dir serves both).
common() {
  cat <<EOF
[paths]
data_dir = "data"
checkpoint_dir = "checkpoints"
output_dir = "output"
log_file = "sac.log"

[dataset]
format = "idx"
source = "/usr/share/datasets/fashion-mnist"
sample = $sample
seed = 0            # overridden per run by --set dataset.seed=<s> (training only; see above)
EOF
}
{
  common
  cat <<EOF

[image]
width = 64
height = 64
resize = "stretch"

[model]
name = "resnet18"

[train]
epochs = $epochs
batch_size = 64
optimizer = "adam"
lr = 4e-4
lr_schedule = "constant"
validate = true
threads = 1
cache = true
EOF
} >"$work/plain.toml"
{
  common
  cat <<EOF

[image]
width = 64
height = 64
resize = "center_crop"
cache_size = 64     # random crops from the whole (28x28) image, as torchvision's

[augment]
random_resized_crop = true
scale = [0.35, 1.0]
hflip = true

[model]
name = "resnet18"

[train]
epochs = $epochs
batch_size = 64
optimizer = "sgd"
lr = 0.1
lr_scaling = "linear"
momentum = 0.9
nesterov = true
weight_decay = 1e-4
norm_weight_decay = 0.0
lr_schedule = "cosine"
warmup_epochs = 1
warmup_decay = 0.01
label_smoothing = 0.1
validate = true
threads = 1
cache = true
EOF
} >"$work/full.toml"

# recipe_torch.py's options per recipe (the same numbers; batch and threads are added per run).
torch_plain=(--optimizer adam --lr 4e-4 --lr-schedule constant --resize stretch)
torch_full=(--optimizer sgd --lr 0.1 --lr-scaling linear --momentum 0.9 --nesterov --weight-decay 1e-4
  --norm-weight-decay 0 --lr-schedule cosine --warmup-epochs 1 --warmup-decay 0.01 --label-smoothing 0.1
  --random-resized-crop --rrc-scale 0.35 1.0 --hflip --resize center_crop)

commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$root" diff --quiet HEAD -- src Cargo.toml Cargo.lock bench 2>/dev/null || commit="$commit (with local changes)"

# record FRAMEWORK RECIPE SEED PRECISION SECONDS FILE: appends one run to $results (rewritten atomically).
[[ -n $resume ]] || echo "[]" >"$results"
record() {
  "$py" - "$results" "$@" "$epochs" "$ranks" "$sample" "$commit" <<'EOF'
import json, os, sys
results, framework, recipe, seed, precision, seconds, path, epochs, ranks, sample, commit = sys.argv[1:]
d = json.load(open(path))
if framework == "sac":  # <checkpoint_dir>/resnet18/state.json
    last = d["history"][-1]
    done, top1, top5 = last["epoch"], last["top1"], last["top5"]
    ran = last.get("precision", d.get("precision"))
    if ran is not None and precision != "auto" and ran != precision:
        sys.exit(f"recipe.sh: {path}: asked for precision {precision}, the run says {ran}")
    if precision == "auto" and ran is not None:
        precision = f"auto ({ran})"
else:  # recipe_torch.py --out
    done = len(d["epochs"])
    top1, top5 = (d["final"] or {}).get("top1"), (d["final"] or {}).get("top5")
if done != int(epochs) or top1 is None:
    sys.exit(f"recipe.sh: {path}: {done} epoch(s) of {epochs}, top-1 {top1}: the run is incomplete")
runs = json.load(open(results))
runs.append({"framework": framework, "recipe": recipe, "seed": int(seed), "precision": precision, "epochs": done,
             "top1": top1, "top5": top5, "seconds": round(float(seconds), 1),
             "ranks": int(ranks), "sample": float(sample), "commit": commit})
with open(results + ".tmp", "w") as f:
    json.dump(runs, f, indent=1)
    f.write("\n")
os.replace(results + ".tmp", results)
print(f"top-1 {100 * top1:.2f} %, top-5 {'-' if top5 is None else f'{100 * top5:.2f} %'}, {float(seconds):.0f} s")
EOF
}

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Paths in the configs are relative to their directory ($work): data/, checkpoints/, sac.log.
run_sac() { # run_sac RECIPE SEED PRECISION
  local recipe=$1 seed=$2 precision=$3 logf=$work/sac-$1-s$2-$3.log state=$work/sac-$1-s$2-$3.state.json t0 seconds line
  rm -rf "$work/checkpoints"
  t0=$(now)
  step "$logf" "$mpiexec" -n "$ranks" "$sac" --config "$work/$recipe.toml" --set "dataset.seed=$seed" \
    --set "train.precision=$precision" train
  seconds=$(since "$t0")
  cp "$work/checkpoints/resnet18/state.json" "$state"
  rm -rf "$work/checkpoints" # a resnet18 checkpoint per epoch; only state.json is needed
  line=$(record sac "$recipe" "$seed" "$precision" "$seconds" "$state")
  log "  sac $recipe seed $seed $precision: $line"
}

run_torch() { # run_torch RECIPE SEED
  local recipe=$1 seed=$2 logf=$work/torch-$1-s$2.log out=$work/torch-$1-s$2.json t0 seconds line
  local -n opts=torch_$recipe
  t0=$(now)
  step "$logf" "$py" -m torch.distributed.run --standalone --nproc-per-node "$ranks" \
    "$root/bench/recipe_torch.py" --ddp --data-dir "$work/data" --out "$out" --epochs "$epochs" \
    --seed "$seed" --batch-size 64 --threads 1 "${opts[@]}"
  seconds=$(since "$t0")
  line=$(record pytorch "$recipe" "$seed" f32 "$seconds" "$out")
  log "  PyTorch $recipe seed $seed: $line"
}

log "work dir $work; results in $results"
log "$epochs epoch(s), seed(s) ${seed_list[*]}, $ranks rank(s), sample $sample"
step "$work/create-dataset.log" "$sac" --config "$work/plain.toml" create-dataset
n_train=$(($(wc -l <"$work/data/train.csv") - 1)) n_test=$(($(wc -l <"$work/data/test.csv") - 1))
log "data dir: $n_train train / $n_test test images"
# Seed by seed, each recipe by both frameworks in turn, so that drift of the machine's speed (and a
# run that fails late) hits both alike.
# done_already FRAMEWORK RECIPE SEED PRECISION: whether $results has that run already (--resume);
# a run without a precision is an f32 run, and "auto" matches "auto (<what it chose>)".
done_already() {
  "$py" -c 'import json, sys
want = (sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
have = lambda r: (r["framework"], r["recipe"], r["seed"], r.get("precision", "f32").split(" ")[0])
sys.exit(0 if any(have(r) == want for r in json.load(open(sys.argv[1]))) else 1)' "$results" "$@"
}
for seed in "${seed_list[@]}"; do
  for recipe in "${recipe_list[@]}"; do
    for framework in "${framework_list[@]}"; do
      if [[ $framework == sac ]]; then
        for precision in "${precision_list[@]}"; do
          if done_already sac "$recipe" "$seed" "$precision"; then
            log "  sac $recipe seed $seed $precision: in $results already"
          else
            run_sac "$recipe" "$seed" "$precision"
          fi
        done
      elif done_already pytorch "$recipe" "$seed" f32; then
        log "  PyTorch $recipe seed $seed: in $results already"
      else
        run_torch "$recipe" "$seed"
      fi
    done
  done
done

machine="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1), $(nproc) cores (nproc)"
commits=$("$py" -c 'import json, sys; print(", ".join(sorted({r.get("commit", "unknown") for r in json.load(open(sys.argv[1]))})))' "$results")
torch_versions=$("$py" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}")')
"$py" "$root/bench/recipe_table.py" "$results" --command "$command_line" --machine "$machine" \
  --note "Data: Fashion-MNIST, sample $sample (seed 0), $n_train train / $n_test test images, 64x64; resnet18 from scratch; sac: $ranks rank(s) x 1 thread, batch 64 per rank; PyTorch: DDP (gloo), $ranks process(es) x 1 thread, batch 64 per process." \
  --note "plain: Adam, lr 4e-4, constant, no augmentation, stretch. full: SGD lr 0.1 x batch/256, momentum 0.9, Nesterov, weight decay 1e-4 (0 on norm and bias), cosine after 1 warmup epoch (from 0.01 x lr), label smoothing 0.1, RandomResizedCrop scale [0.35, 1] + hflip, center_crop evaluation (73 -> 64)." \
  --note "Versions: sac $commits; $torch_versions." | tee "$table_md"
ok=1
log "results: $results; table: $table_md"
