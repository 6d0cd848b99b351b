#!/usr/bin/env bash
# sac across hosts against PyTorch DDP on the same links (BENCHMARKS.md, "Across hosts"): the
# emulated cluster of tests/multinode/run.sh (HOSTS hosts of one core each, links shaped to each
# profile), resnet18 from scratch at 64x64 on the default data (Fashion-MNIST, 10 % sample, seed 0),
# batch 64 per rank, one rank (one torch thread) per host, one epoch without validation:
#
#   sac, overlap   mpiexec -f HOSTFILE -n HOSTS -ppn 1 sac train (train.overlap = true, the default)
#   sac, after     the same with train.overlap = false (the exchange after backward)
#   DDP            bench/torchrun_hosts.sh: torchrun on every host, bench/baselines.py ddp (gloo over
#                  eth0, DistributedSampler, PIL + torchvision transforms, Adam)
#   sac, auto      train.overlap = "auto": steps 3-10 try both ways, the rest go the faster one
#                  (the epoch's images/s include the trial; --no-auto leaves it out)
#   and for each further format of --exchange (bf16): sac with overlap and train.exchange = bf16,
#   and DDP with the same format (its bf16_compress_hook)
#
# and, on one core with nothing else running, the compute limit: forward + backward alone on
# pre-loaded tensors (bench/baselines.py compute --no-step). Per profile also `sac mpi-check`
# across the hosts: the link's latency and bandwidth (the alpha and beta of bench/cost_model.py)
# and the measured exchange of resnet18's gradients. The runs of a round are interleaved, so
# machine drift hits all alike; the table gives medians (min-max) over the rounds.
#
#   bench/multinode.sh                       # profiles 1g 10g, f32 and bf16, 3 rounds (~45 min, 2 cores)
#   bench/multinode.sh --profiles "1g" --rounds 1 --exchange f32
#   bench/multinode.sh --smoke               # plumbing: a 300-image sample, profile 1g, 1 round
#
# Writes bench/results/multinode-<timestamp>/{results.jsonl,table.md,logs/}. Needs root (the
# emulated cluster), .venv (scripts/setup.sh) and target/release/sac.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
profiles="1g 10g" rounds=3 hosts=2 sample=0.1 smoke=0 exchange="f32 bf16" auto=1
command_line=$(echo "bench/multinode.sh $*" | sed "s/ *$//")
while (($#)); do
  case $1 in
    --profiles) profiles=${2:?}; shift 2 ;;
    --rounds) rounds=${2:?}; shift 2 ;;
    --hosts) hosts=${2:?}; shift 2 ;;
    --exchange) exchange=${2:?}; shift 2 ;;
    --no-auto) auto=0; shift ;;
    --smoke) smoke=1 profiles=1g rounds=1 sample=300 exchange=f32 auto=0; shift ;;
    -h | --help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "multinode.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
sac=$root/target/release/sac
py=$root/.venv/bin/python
[[ -x $sac ]] || { echo "multinode.sh: $sac is missing: build sac first (cargo build --release)" >&2; exit 2; }
[[ -x $py ]] || { echo "multinode.sh: $py is missing: run scripts/setup.sh" >&2; exit 2; }
cluster=$root/tests/multinode/run.sh
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=$root/bench/results/multinode-$stamp
if ((smoke)); then out+=-smoke; fi
mkdir -p "$out/logs"
results=$out/results.jsonl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log() { printf '\033[1mmultinode:\033[0m %s\n' "$*" >&2; }

# The data dir, as `sac create-dataset` makes it from the default config.
cp config.toml "$work/config.toml"
(cd "$work" && "$sac" -q create-dataset --sample "$sample" >"$out/logs/create-dataset.log" 2>&1)
data=$work/data
log "data: $(($(wc -l <"$data/train.csv") - 1)) training images in $data; $hosts hosts; profiles $profiles; $rounds round(s)"

record() { echo "$1" >>"$results"; }

run_sac() { # run_sac PROFILE OVERLAP ROUND [EXCHANGE]; OVERLAP: true, false or auto
  local p=$1 ov=$2 r=$3 ex=${4:-f32}
  local way
  case $ov in true) way=overlap ;; false) way=after ;; *) way=auto ov='"auto"' ;; esac
  local name="sac-$p-$way$([[ $ex == f32 ]] || echo "-$ex")-r$3"
  local ck=$work/ck-$name
  "$cluster" --hosts "$hosts" --profile "$p" --timeout 1200 -- \
    mpiexec -f HOSTFILE -n "$hosts" -ppn 1 "$sac" -c "$work/config.toml" train --epochs 1 \
    --set train.validate=false --set train.log_every=0 --set "train.overlap=$ov" \
    --set "train.exchange=\"$ex\"" --set "paths.checkpoint_dir=$ck" >"$out/logs/$name.log" 2>&1 ||
    { log "$name failed: see $out/logs/$name.log"; tail -5 "$out/logs/$name.log" >&2; exit 1; }
  "$py" - "$ck/resnet18/metrics.jsonl" "$p" "$way" "$r" "$hosts" "$ex" "$out/logs/$name.log" >>"$results" <<'PYEOF'
import json, sys
path, profile, way, rnd, hosts, exchange, log = sys.argv[1:]
ep = [json.loads(l) for l in open(path) if '"kind":"epoch"' in l][-1]
steps = ep["global_step"]
extra = {}
if way == "auto":
    # The way rank 0 chose after its trial (steps 3-10), from its log line.
    line = next((l for l in open(log) if "the exchange runs" in l), "")
    extra = {"auto": True, "chose": "overlap" if "runs with overlap" in line else "after" if "runs after backward" in line else None}
print(json.dumps({"what": "sac", "overlap": way != "after", **extra, "exchange": exchange, "profile": profile, "round": int(rnd),
                  "ranks": int(hosts), "images_per_second": ep["images_per_second"], "seconds": ep["seconds"],
                  "steps": steps, "exposed_exchange_ms": 1e3 * ep["exchange"] * ep["seconds"] / steps,
                  "exchange_wait_ms": 1e3 * ep.get("exchange_wait", 0.0) * ep["seconds"] / steps,
                  "compute_ms": 1e3 * ep["compute"] * ep["seconds"] / steps}))
PYEOF
}

run_ddp() { # run_ddp PROFILE ROUND [EXCHANGE]
  local p=$1 r=$2 ex=${3:-f32}
  local name="ddp-$1$([[ $ex == f32 ]] || echo "-$ex")-r$2"
  "$cluster" --hosts "$hosts" --profile "$p" --timeout 1200 -- \
    "$root/bench/torchrun_hosts.sh" HOSTFILE -- "$root/bench/baselines.py" ddp --data "$data" --epochs 1 \
    --compress "$([[ $ex == f32 ]] && echo none || echo "$ex")" --timeout 600 >"$out/logs/$name.log" 2>&1 ||
    { log "$name failed: see $out/logs/$name.log"; tail -5 "$out/logs/$name.log" >&2; exit 1; }
  local line
  line=$(grep '^{' "$out/logs/$name.log" | tail -1)
  "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(profile=sys.argv[2], round=int(sys.argv[3])); print(json.dumps(d))' \
    "$line" "$p" "$r" >>"$results"
}

run_compute() { # run_compute ROUND: one rank's forward + backward on one core, nothing else running
  local line
  line=$(taskset -c 0 "$py" bench/baselines.py compute --no-step --steps $((smoke ? 3 : 10)) 2>"$out/logs/compute-r$1.log" | tail -1)
  "$py" -c 'import json,sys; d=json.loads(sys.argv[1]); d.update(round=int(sys.argv[2])); print(json.dumps(d))' "$line" "$1" >>"$results"
}

run_check() { # run_check PROFILE: the link and the exchange, measured by sac mpi-check
  local p=$1
  "$cluster" --hosts "$hosts" --profile "$p" --timeout 600 -- \
    mpiexec -f HOSTFILE -n "$hosts" -ppn 1 "$sac" mpi-check --reps $((smoke ? 2 : 10)) >"$out/logs/mpi-check-$p.log" 2>&1 ||
    { log "mpi-check at $p failed: see $out/logs/mpi-check-$p.log"; exit 1; }
  "$py" bench/cost_model.py parse --profile "$p" --ranks "$hosts" <"$out/logs/mpi-check-$p.log" >>"$results"
}

for p in $profiles; do
  log "mpi-check at $p"
  run_check "$p"
done
for ((r = 1; r <= rounds; r++)); do
  log "round $r/$rounds: compute limit"
  run_compute "$r"
  for p in $profiles; do
    log "round $r/$rounds, $p: sac (overlap), sac (after backward), DDP"
    run_sac "$p" true "$r"
    run_sac "$p" false "$r"
    run_ddp "$p" "$r"
    if ((auto)); then run_sac "$p" auto "$r"; fi
    for ex in $exchange; do
      [[ $ex == f32 ]] && continue
      log "round $r/$rounds, $p: sac (overlap, $ex), DDP ($ex)"
      run_sac "$p" true "$r" "$ex"
      run_ddp "$p" "$r" "$ex"
    done
  done
done
"$py" bench/cost_model.py table "$results" --command "$command_line" | tee "$out/table.md"
log "results in $out"
