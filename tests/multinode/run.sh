#!/usr/bin/env bash
# An emulated cluster on this one machine: HOSTS hosts made of Linux network namespaces, each with
# its own hostname (a UTS namespace per process started on it), its own cores (a CPU affinity
# mask) and one Ethernet link (a veth pair) into a switch (a bridge in a namespace of its own),
# every link shaped with tc; then one command run on host 0, the way a user runs it on the login
# node of a cluster, and everything torn down again, also when the command fails or times out.
#
#   tests/multinode/run.sh [options] -- mpiexec -f HOSTFILE -n 4 sac mpi-check
#   tests/multinode/run.sh --hosts 2 --profile 1g -- mpiexec -f HOSTFILE -n 2 -ppn 1 sac train
#   tests/multinode/run.sh -- mpiexec.openmpi --hostfile HOSTFILE -n 4 target/openmpi/release/sac mpi-check
#
# In COMMAND, the word HOSTFILE becomes the path of the cluster's host file (one line per host,
# "name:ranks-per-host"), and `mpiexec` gets what makes MPICH's Hydra start its proxies on the
# emulated hosts: `-launcher ssh -launcher-exec <enter>` (enter plays ssh: it runs the proxy in
# the host's namespaces, as sshd would on a real node) and the environment below. Nothing else
# differs from the command a user types on a real cluster (where HOSTFILE is, e.g.,
# $PBS_NODEFILE, or Slurm's nodes). Open MPI's launcher (`mpiexec.openmpi`) gets a host file of
# its own format ("name slots=N"), `--mca plm_rsh_agent <enter>`, the interface its daemons and
# its TCP transport use (eth0), and the same UCX variables with -x. The files are shared, as on a cluster with a shared file
# system: every host sees this machine's paths.
#
# Options:
#   --hosts N            hosts (default 2)
#   --ranks-per-host R   slots per host in the host file (default 1)
#   --cores-per-host C   cores each host may use (default: this machine's cores / N, at least 1);
#                        host i gets cores i*C .. i*C+C-1 (modulo the machine's)
#   --profile P          the links: none (unshaped veth), 1g (1 Gb/s), 10g (10 Gb/s), or a tc rate
#                        such as 2500mbit (default none). Shaped with tbf on every host's egress.
#                        This kernel has no sch_netem, so no delay is added: the latency is the
#                        veth path's own (tens of microseconds), and only the bandwidth is shaped.
#   --timeout S          the command's time limit in seconds (default 900); on expiry every
#                        process of the command is killed and the script exits 124
#   --keep               leave the cluster up (for debugging; prints how to tear it down)
#
# Environment given to every rank (through mpiexec): UCX_TLS=tcp and UCX_NET_DEVICES=eth0, so
# that ranks on different hosts talk over the shaped link. Network namespaces do not separate
# /dev/shm, and UCX would otherwise find its shared-memory transports between "hosts" on the same
# machine; MPICH itself uses shared memory only between ranks that Hydra placed on the same host
# (by hostname), as on a real cluster.
#
# Needs root (namespaces, links, tc), iproute2, util-linux (unshare, taskset) and the launcher.
# Exit status: the command's, 124 when it timed out, 2 for a bad option or a missing tool.
set -euo pipefail

hosts=2 per_host=1 cores_per_host= profile=none limit=900 keep=0
usage() { sed -n '8,9p;19,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "multinode: $*" >&2; exit 2; }
while (($#)); do
  case $1 in
    --hosts) hosts=${2:?--hosts needs a value}; shift 2 ;;
    --ranks-per-host) per_host=${2:?--ranks-per-host needs a value}; shift 2 ;;
    --cores-per-host) cores_per_host=${2:?--cores-per-host needs a value}; shift 2 ;;
    --profile) profile=${2:?--profile needs a value}; shift 2 ;;
    --timeout) limit=${2:?--timeout needs a value}; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help) usage 0 ;;
    --) shift; break ;;
    *) echo "multinode: unknown option $1" >&2; usage ;;
  esac
done
(($#)) || { echo "multinode: no command after --" >&2; usage; }
for v in hosts per_host limit; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "--${v//_/-} must be a positive integer, not '${!v}'"
done
((hosts <= 32)) || die "--hosts $hosts: at most 32"
machine_cores=$(nproc --all)
[[ -n $cores_per_host ]] || cores_per_host=$((machine_cores / hosts > 0 ? machine_cores / hosts : 1))
[[ $cores_per_host =~ ^[1-9][0-9]*$ ]] || die "--cores-per-host must be a positive integer, not '$cores_per_host'"
case $profile in
  none) rate= ;;
  1g) rate=1gbit ;;
  10g) rate=10gbit ;;
  *[0-9][kmg]bit | *[0-9]bit) rate=$profile ;;
  *) die "--profile $profile: none, 1g, 10g or a tc rate such as 2500mbit" ;;
esac
((EUID == 0)) || die "needs root (network namespaces, links, tc)"
for tool in ip tc unshare taskset "$1"; do
  command -v "$tool" >/dev/null || die "$tool is not on PATH"
done

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
enter=$here/enter
[[ -x $enter ]] || die "$enter is missing or not executable"

# Names carry this script's PID, so clusters of concurrent runs do not meet, and a cluster left by
# a run that was killed (SIGKILL skips the trap) is recognised and removed by the next run.
tag=sacmn$$
sw=$tag-sw
host_name() { echo "$tag-h$1"; }
work=$(mktemp -d "${TMPDIR:-/tmp}/sac-multinode.XXXXXX")
hostfile=$work/hosts

down() { # down TAG: removes the namespaces and /etc/netns entries of cluster TAG
  local t=$1 ns
  for ns in $(ip netns list | awk '{print $1}' | grep "^$t-" || true); do
    # Processes left in a host (a rank that ignored the kill) would keep it alive: end them.
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
  done
}
for stale in $(ip netns list | awk '{print $1}' | sed -n 's/^\(sacmn[0-9]*\)-.*/\1/p' | sort -u); do
  pid=${stale#sacmn}
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "multinode: removing the cluster of an earlier run that did not tear down ($stale)" >&2
    down "$stale"
  fi
done

finish() {
  local rc=$?
  if ((keep)); then
    echo "multinode: cluster kept; tear down with: for n in \$(ip netns list | awk '/^$tag-/{print \$1}'); do ip netns del \$n; rm -rf /etc/netns/\$n; done" >&2
  else
    down "$tag"
    rm -rf "$work"
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the cluster -------------------------------------------------------------------------------
ip netns add "$sw"
ip -n "$sw" link add name br0 type bridge
ip -n "$sw" link set br0 up
ip -n "$sw" link set lo up
hosts_lines="127.0.0.1 localhost"
for ((i = 0; i < hosts; i++)); do
  hosts_lines+=$'\n'"10.77.0.$((i + 1)) $(host_name "$i")"
done
: >"$hostfile"
for ((i = 0; i < hosts; i++)); do
  h=$(host_name "$i")
  ip netns add "$h"
  ip -n "$sw" link add name "p$i" type veth peer name eth0 netns "$h"
  ip -n "$sw" link set "p$i" master br0 up
  ip -n "$h" link set lo up
  ip -n "$h" addr add "10.77.0.$((i + 1))/24" dev eth0
  ip -n "$h" link set eth0 up
  if [[ -n $rate ]]; then
    # Token bucket at the link rate; the bucket holds a few packets (a NIC's line rate, no long
    # bursts), the queue 5 ms of traffic.
    ip netns exec "$h" tc qdisc add dev eth0 root tbf rate "$rate" burst 64kb latency 5ms
  fi
  # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts: every host knows the others.
  mkdir -p "/etc/netns/$h"
  printf '%s\n' "$hosts_lines" >"/etc/netns/$h/hosts"
  # The cores of host i.
  first=$((i * cores_per_host))
  cpus=
  for ((c = 0; c < cores_per_host; c++)); do cpus+=${cpus:+,}$(((first + c) % machine_cores)); done
  echo "$cpus" >"$work/$h.cpus"
  echo "$h:$per_host" >>"$hostfile"
done
echo "multinode: $hosts host(s) ($(host_name 0) .. $(host_name $((hosts - 1)))), $cores_per_host core(s) and" \
  "$per_host slot(s) each, links: ${rate:-unshaped veth}; host file $hostfile" >&2

# ---- the command, on host 0 ---------------------------------------------------------------------
# Open MPI's launcher (mpiexec.openmpi, mpirun.openmpi) reads "name slots=N" host files, starts
# its daemons through plm_rsh_agent (enter, as for Hydra), and is told which interface its own
# traffic (oob) and the ranks' (btl tcp; UCX for its ucx pml) may use; its ranks on one emulated
# host use shared memory, those on different ones the shaped link, as on a real cluster.
sed 's/:\([0-9]*\)$/ slots=\1/' "$hostfile" >"$hostfile.openmpi"
openmpi=0
for a in "$@"; do [[ $a == mpiexec.openmpi || $a == */mpiexec.openmpi || $a == mpirun.openmpi ]] && openmpi=1; done
args=()
for a in "$@"; do
  [[ $a == HOSTFILE ]] && a=$hostfile
  ((openmpi)) && [[ $a == "$hostfile" ]] && a=$hostfile.openmpi
  args+=("$a")
  if [[ $a == mpiexec || $a == */mpiexec ]]; then
    args+=(-launcher ssh -launcher-exec "$enter" -genv UCX_TLS tcp -genv UCX_NET_DEVICES eth0)
  elif [[ $a == mpiexec.openmpi || $a == */mpiexec.openmpi || $a == mpirun.openmpi ]]; then
    args+=(--mca plm_rsh_agent "$enter" --mca oob_tcp_if_include eth0 --mca btl_tcp_if_include eth0
      -x UCX_TLS=tcp -x UCX_NET_DEVICES=eth0 -x SAC_MULTINODE_CPUS_DIR --allow-run-as-root)
  fi
done
echo "multinode: on $(host_name 0): ${args[*]}" >&2
rc=0
SAC_MULTINODE_CPUS_DIR=$work timeout --kill-after=10 "$limit" \
  "$enter" "$(host_name 0)" "$(printf '%q ' "${args[@]}")" || rc=$?
((rc == 124)) && echo "multinode: the command did not end within $limit s: killed" >&2
exit "$rc"
