#!/usr/bin/env bash
# The whole job on the default config.toml: set-up, build, then
#   sac create-dataset  →  mpiexec -n $RANKS sac train  →  mpiexec -n $RANKS sac evaluate
# Environment: RANKS (default 4), CONFIG (default config.toml), SAC_ARGS (extra flags for train).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
ranks="${RANKS:-4}"
config="${CONFIG:-config.toml}"

bash scripts/setup.sh
echo "== building sac (release)" >&2
cargo build --release --quiet
sac="$root/target/release/sac"

echo "== sac create-dataset" >&2
"$sac" --config "$config" create-dataset
# The job starts from scratch (create-dataset has just written the data dir): the checkpoint of an
# earlier run of this script is replaced, unless SAC_ARGS asks to --resume it.
read -ra train_args <<<"${SAC_ARGS:-}"
[[ " ${SAC_ARGS:-} " == *" --resume "* ]] || train_args+=(--overwrite)
echo "== mpiexec -n $ranks sac train ${train_args[*]}" >&2
mpiexec -n "$ranks" "$sac" --config "$config" train "${train_args[@]}"
echo "== mpiexec -n $ranks sac evaluate" >&2
mpiexec -n "$ranks" "$sac" --config "$config" evaluate
