#!/usr/bin/env bash
# Starts one torchrun per host of a host file, as a PyTorch user starts DDP on a cluster without a
# launcher of its own (`ssh node torchrun --nnodes ... --node-rank i ...` on each node), for the
# PyTorch DDP baseline of bench/multinode.sh. Runs on host 0 of tests/multinode/run.sh's emulated
# cluster, which reaches the other hosts with tests/multinode/enter (its ssh):
#
#   tests/multinode/run.sh --hosts 2 -- bench/torchrun_hosts.sh HOSTFILE -- bench/baselines.py ddp --data DIR
#
# HOSTFILE: "name:slots" per line (slots = processes on that host). Rendezvous at host 0's first
# name, port 29511; gloo over eth0 (GLOO_SOCKET_IFNAME), one torch thread per process. Every host's
# output goes to this script's stdout/stderr. Exit status: the first failing host's, else 0.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hostfile=${1:?usage: torchrun_hosts.sh HOSTFILE -- SCRIPT ARGS...}
shift
[[ ${1:-} == -- ]] && shift
(($#)) || { echo "torchrun_hosts: no script after --" >&2; exit 2; }
enter=$root/tests/multinode/enter
torchrun=$root/.venv/bin/torchrun
mapfile -t lines < <(grep -v '^\s*$' "$hostfile")
nnodes=${#lines[@]}
master=${lines[0]%%:*}
script=$(printf '%q ' "$@")
pids=()
for ((i = 0; i < nnodes; i++)); do
  host=${lines[i]%%:*}
  slots=${lines[i]#*:}
  [[ $slots == "${lines[i]}" ]] && slots=1
  # enter runs its command with `exec` (as sshd's shell would the last one): one command, absolute paths.
  "$enter" "$host" "env GLOO_SOCKET_IFNAME=eth0 OMP_NUM_THREADS=1 $torchrun" \
    "--nnodes $nnodes --nproc-per-node $slots --node-rank $i --master-addr $master --master-port 29511 $script" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  wait "$p" || { r=$?; ((rc == 0)) && rc=$r; }
done
exit "$rc"
