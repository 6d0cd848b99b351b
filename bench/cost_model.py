"""The alpha-beta cost model of sac's gradient exchange, and the tables of bench/multinode.sh.

A ring allreduce of n bytes over p ranks sends 2 (p-1) messages of n/p bytes from every rank, one
after the other, while it receives as many: T = 2 (p-1) alpha + V / B with V = 2 (p-1)/p * n,
where alpha is a message's latency and B the bandwidth of one direction. sac sums its gradients
in k buckets, each one allreduce: the latency term counts k times. alpha and B are what
`sac mpi-check` measured between two hosts (ping-pong of 8 B and of 8 MiB). Where a host's own
TCP processing, not the link, limits a transfer (the emulated hosts have one core each: their
ping-pong stops at ~4.4 Gb/s on the 10 Gb/s links), sending and receiving at once share it:
T = 2 (p-1) k alpha + max(V / B, 2 V / H), H the fastest one-way bandwidth measured (the host's
limit). The model is checked against the allreduce mpi-check timed, and against the exchange that
sac's training leaves after backward when it does not overlap, less the time rank 0 waited there
for the slower rank to arrive (training's `exchange_wait`, which no model of the link predicts).

  cost_model.py parse --profile 1g --ranks 2 < mpi-check.log      # one JSON line
  cost_model.py table results.jsonl [--command CMD]                 # the markdown tables
"""
import argparse
import json
import re
import statistics
import sys

# Gradient floats of the models the extrapolation covers (trained parameters, as sac counts them).
MODELS = {
    "resnet18, 10 classes": 11_181_642,
    "resnet50, 10 classes": 23_528_522,
    "resnet18, 64,500 classes": 11_176_512 + 512 * 64_500 + 64_500,
    "resnet50, 64,500 classes": 23_508_032 + 2048 * 64_500 + 64_500,
}
RANKS = [8, 32, 128, 512]
LINKS_GBPS = [10, 25, 100]
# Latency of one message on a real cluster's TCP over Ethernet (the emulated links here have
# only the veth path's few microseconds, no cable or switch): an assumption, stated in the table.
ALPHA_CLUSTER_US = 25.0
BUCKETS = 6


def ring_seconds(floats, ranks, alpha_s, gbps, buckets, host_gbps=None):
    """One exchange: k buckets, each a ring allreduce. Every rank sends and receives
    V = 2 (p-1)/p n bytes at once; the link carries each direction at `gbps`, and a host whose TCP
    processing is the narrower pipe (`host_gbps`, what one direction reaches when the link is
    not the limit) must push both directions through it."""
    n = 4.0 * floats
    if ranks < 2:
        return 0.0
    v = 2 * (ranks - 1) / ranks * n * 8
    wire = v / (gbps * 1e9)
    host = 2 * v / (host_gbps * 1e9) if host_gbps else 0.0
    return buckets * 2 * (ranks - 1) * alpha_s + max(wire, host)


def parse(a):
    text = sys.stdin.read()
    link = None
    for m in re.finditer(r"link rank 0 <-> rank \d+ \((\S+) <-> (\S+)\): latency ([\d.]+) us, bandwidth ([\d.]+) Gb/s", text):
        if m.group(1) != m.group(2):
            link = (float(m.group(3)), float(m.group(4)))
    ex = re.search(r"gradients \(\d+ tensors, ([\d.]+) M floats, (\d+) buckets.*?fused ([\d.]+) \(allreduce alone ([\d.]+)\)", text)
    if link is None or ex is None:
        sys.exit("cost_model.py parse: no link between hosts or no exchange timing in mpi-check's output")
    print(json.dumps({
        "what": "link", "profile": a.profile, "ranks": a.ranks, "latency_us": link[0], "bandwidth_gbps": link[1],
        "floats": float(ex.group(1)) * 1e6, "buckets": int(ex.group(2)),
        "fused_ms": float(ex.group(3)), "allreduce_ms": float(ex.group(4)),
    }))


def med(values):
    values = list(values)
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(values, digits=1):
    m, lo, hi = med(values)
    if m is None:
        return "–"
    if lo == hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def sac_f32(overlap):
    """sac with the f32 exchange, overlap fixed on or off (not "auto")."""
    return lambda r: (r["what"] == "sac" and r["overlap"] == overlap and not r.get("auto")
                      and r.get("exchange", "f32") == "f32")


def ddp(compress="none"):
    """PyTorch DDP, its gradients sent as they are or through a compression hook."""
    return lambda r: r["what"] == "train" and r.get("impl") == "ddp" and r.get("compress", "none") == compress


def by_round(rows, profile, pred):
    """The runs of one contender on one profile, by round (the runs of a round are back to back)."""
    return {r["round"]: r for r in rows if r.get("profile") == profile and pred(r)}


def table(a):
    rows = [json.loads(l) for l in open(a.results) if l.strip()]
    links = {r["profile"]: r for r in rows if r["what"] == "link"}
    compute = [r["images_per_second"] for r in rows if r["what"] == "compute"]
    limit = statistics.median(compute) if compute else None
    profiles = list(dict.fromkeys(r["profile"] for r in rows if "profile" in r and r["what"] != "link"))
    out = []
    w = out.append
    if a.command:
        w(f"Command: `{a.command}`\n")
    ranks = next((r["ranks"] for r in rows if r["what"] == "sac"), 2)
    w(f"Images/s over one epoch, {ranks} hosts of one core, one rank each; median (min–max) of "
      f"{len(compute)} round(s). Compute limit (one core, forward + backward on pre-loaded tensors): "
      f"{fmt(compute)} images/s.\n")
    w("| link | sac, overlap | sac, after backward | PyTorch DDP | overlap ÷ DDP | overlap ÷ after | "
      "exchange left after backward, ms/step (overlap / after) | left ÷ after | scaling efficiency (overlap) |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in profiles:
        # Ratios per round, then their median.
        on_r, off_r, ddp_r = (by_round(rows, p, pred) for pred in (sac_f32(True), sac_f32(False), ddp()))
        on, off, base = list(on_r.values()), list(off_r.values()), list(ddp_r.values())
        vs_ddp = [on_r[k]["images_per_second"] / ddp_r[k]["images_per_second"] for k in on_r if k in ddp_r]
        vs_off = [on_r[k]["images_per_second"] / off_r[k]["images_per_second"] for k in on_r if k in off_r]
        left = [on_r[k]["exposed_exchange_ms"] / off_r[k]["exposed_exchange_ms"] for k in on_r if k in off_r]
        eff = [r["images_per_second"] / (r["ranks"] * limit) for r in on] if limit else []
        exposed = f"{fmt([r['exposed_exchange_ms'] for r in on], 0)} / {fmt([r['exposed_exchange_ms'] for r in off], 0)}"
        w(f"| {p} | {fmt([r['images_per_second'] for r in on])} | {fmt([r['images_per_second'] for r in off])} | "
          f"{fmt([r['images_per_second'] for r in base])} | {fmt(vs_ddp, 2)}× | {fmt(vs_off, 2)}× | {exposed} | "
          f"{fmt([100 * x for x in left], 0)} % | {fmt([100 * x for x in eff], 0)} % |")
    w("")
    auto_profiles = [p for p in profiles if any(r["what"] == "sac" and r.get("auto") and r.get("profile") == p for r in rows)]
    if auto_profiles:
        w("`train.overlap = \"auto\"` in the same rounds (its epoch includes the trial: steps 3–10 of 44 take turns):\n")
        w("| link | sac, auto | way chosen per round | auto ÷ DDP | auto ÷ faster of overlap and after |")
        w("|---|---:|---|---:|---:|")
        for p in auto_profiles:
            auto = by_round(rows, p, lambda r: r["what"] == "sac" and r.get("auto"))
            on, off, base = (by_round(rows, p, pred) for pred in (sac_f32(True), sac_f32(False), ddp()))
            ips = lambda d, k: d[k]["images_per_second"]
            vs_ddp = [ips(auto, k) / ips(base, k) for k in auto if k in base]
            vs_best = [ips(auto, k) / max(ips(on, k), ips(off, k)) for k in auto if k in on and k in off]
            chose = ", ".join(str(auto[k].get("chose")) for k in sorted(auto))
            w(f"| {p} | {fmt([r['images_per_second'] for r in auto.values()])} | {chose} | {fmt(vs_ddp, 2)}× | "
              f"{fmt(vs_best, 2)}× |")
        w("")
    half_profiles = [p for p in profiles if any(r["what"] == "sac" and r.get("profile") == p
                                                and r.get("exchange") == "bf16" for r in rows)]
    if half_profiles:
        w("Gradients exchanged as bfloat16 (sac: `train.exchange = \"bf16\"`, with overlap; DDP: "
          "its `bf16_compress_hook`), in the same rounds:\n")
        w("| link | sac, overlap, bf16 | PyTorch DDP, bf16 | sac bf16 ÷ DDP bf16 | sac bf16 ÷ DDP f32 | "
          "sac bf16 ÷ sac f32 (overlap) | exchange left after backward, ms/step (bf16 / f32 after) | left ÷ f32 after |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|")
        for p in half_profiles:
            half = by_round(rows, p, lambda r: r["what"] == "sac" and r["overlap"] and r.get("exchange") == "bf16")
            on, off, base, dhalf = (by_round(rows, p, pred) for pred in (sac_f32(True), sac_f32(False), ddp(), ddp("bf16")))
            ips = lambda d: [r["images_per_second"] for r in d.values()]
            ratio = lambda a, b: [a[k]["images_per_second"] / b[k]["images_per_second"] for k in a if k in b]
            left = [half[k]["exposed_exchange_ms"] / off[k]["exposed_exchange_ms"] for k in half if k in off]
            w(f"| {p} | {fmt(ips(half))} | {fmt(ips(dhalf))} | {fmt(ratio(half, dhalf), 2)}× | {fmt(ratio(half, base), 2)}× | "
              f"{fmt(ratio(half, on), 2)}× | {fmt([r['exposed_exchange_ms'] for r in half.values()], 0)} / "
              f"{fmt([r['exposed_exchange_ms'] for r in off.values()], 0)} | {fmt([100 * x for x in left], 0)} % |")
        w("")
    if links:
        w("The model against the measurements (α, B: `sac mpi-check` between the hosts; k buckets; "
          f"host limit H = {max(l['bandwidth_gbps'] for l in links.values()):.2f} Gb/s):\n")
        w("| link | α (µs) | B (Gb/s) | floats | k | model (ms) | mpi-check allreduce (ms) | error | "
          "sac after backward, exchange (ms/step) | of it waiting for the other rank | the rest | error |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        host = max(l["bandwidth_gbps"] for l in links.values())
        for p, l in links.items():
            t = 1e3 * ring_seconds(l["floats"], l["ranks"], l["latency_us"] * 1e-6, l["bandwidth_gbps"], l["buckets"], host)
            off = list(by_round(rows, p, sac_f32(False)).values())
            waits = [r["exchange_wait_ms"] for r in off if "exchange_wait_ms" in r]
            # Runs of sac before exchange_wait was measured: the whole exchange, wait included.
            moving = [r["exposed_exchange_ms"] - r.get("exchange_wait_ms", 0.0) for r in off]
            m_moving = statistics.median(moving) if moving else None
            err_off = f"{100 * (t - m_moving) / m_moving:+.0f} %" if m_moving else "–"
            w(f"| {p} | {l['latency_us']:.1f} | {l['bandwidth_gbps']:.2f} | {l['floats'] / 1e6:.1f} M | {l['buckets']} | "
              f"{t:.0f} | {l['allreduce_ms']:.0f} | {100 * (t - l['allreduce_ms']) / l['allreduce_ms']:+.0f} % | "
              f"{fmt([r['exposed_exchange_ms'] for r in off], 0)} | {fmt(waits, 0) if waits else '–'} | "
              f"{fmt(moving, 0) if moving else '–'} | {err_off} |")
        w("")
        # The extrapolation: the bandwidth a link delivers is the share measured here at the
        # nearest profile (TCP's and the MPI's overheads), the latency a real cluster's.
        # The share of a link's rate that a transfer gets where the link is the limit (1 Gb/s).
        eff_bw = links["1g"]["bandwidth_gbps"] / 1.0 if "1g" in links else 0.95
        w(f"Extrapolation: ring allreduce per step (ms), k = {BUCKETS} buckets, α = {ALPHA_CLUSTER_US:.0f} µs "
          f"(TCP on a real cluster; assumed), links delivering {100 * eff_bw:.0f} % of their rate (as measured here at 1 Gb/s), "
          "hosts fast enough to feed them:\n")
        w("| gradients | link | " + " | ".join(f"{p} ranks" for p in RANKS) + " |")
        w("|---|---|" + "---:|" * len(RANKS))
        for name, floats in MODELS.items():
            for g in LINKS_GBPS:
                cells = [ring_seconds(floats, p, ALPHA_CLUSTER_US * 1e-6, g * eff_bw, BUCKETS) * 1e3 for p in RANKS]
                w(f"| {name} ({floats / 1e6:.1f} M floats) | {g} Gb/s | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("parse")
    s.add_argument("--profile", required=True)
    s.add_argument("--ranks", type=int, required=True)
    s = sub.add_parser("table")
    s.add_argument("results")
    s.add_argument("--command", default="")
    a = ap.parse_args()
    {"parse": parse, "table": table}[a.cmd](a)


if __name__ == "__main__":
    main()
