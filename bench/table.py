"""Turns bench/run.sh's results.jsonl into the Markdown table of BENCHMARKS.md.

Every figure is the median over the rounds, with min–max; ratios are of medians measured in the
same run.
"""
import json
import os
import platform
import statistics
import sys
from collections import defaultdict


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(values, digits=1):
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def med(values):
    return statistics.median(values) if values else float("nan")


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
    by = defaultdict(list)
    for r in rows:
        by[(r["what"], r["impl"], r["n"])].append(r)
    cores = os.cpu_count() or 1
    # The compute limit is forward + backward alone (`compute --no-step`); results of runs made
    # before bench/run.sh measured it so hold only the limit with torch's Adam step, named as such.
    key, what = ("compute", "torch-fwd-bwd", 1), "forward + backward alone"
    if key not in by:
        key, what = ("compute", "torch", 1), "forward + backward + torch's Adam step"
    rounds = len(by.get(key, [])) or 1
    print(f"Machine: {cores} cores, {cpu_model()}; {rounds} round(s); median (min–max).\n")

    limit1 = med([r["images_per_second"] for r in by[key]])
    print(f"Compute limit (1 process, pre-loaded tensors, resnet18 64x64, batch 64, {what}, 1 thread): "
          f"{fmt([r['images_per_second'] for r in by[key]])} images/s\n")

    print("### Training (one epoch, images/s over all ranks)\n")
    print("| N | sac | DDP (gloo) | limit | sac / limit | DDP / limit | sac / DDP | peak RSS per rank, MiB: sac / DDP | CPU s per image: sac / DDP |")
    print("|---|---|---|---|---|---|---|---|---|")
    ns = sorted({n for (w, i, n) in by if w == "train"})
    for n in ns:
        s = [r["images_per_second"] for r in by[("train", "sac", n)]]
        d = [r["images_per_second"] for r in by[("train", "ddp", n)]]
        limit = limit1 * min(n, cores)
        rs = [max(r["peak_rss_mib"]) for r in by[("train", "sac", n)] if r.get("peak_rss_mib")]
        rd = [max(r["peak_rss_mib"]) for r in by[("train", "ddp", n)] if r.get("peak_rss_mib")]
        cs = [r["cpu_seconds_per_image"] for r in by[("train", "sac", n)]]
        cd = [r["cpu_seconds_per_image"] for r in by[("train", "ddp", n)]]
        print(f"| {n} | {fmt(s)} | {fmt(d)} | {limit:.1f} | {med(s) / limit:.2f} | {med(d) / limit:.2f} | "
              f"{med(s) / med(d):.2f} | {fmt(rs, 0)} / {fmt(rd, 0)} | {fmt(cs, 4)} / {fmt(cd, 4)} |")

    print("\n### Gradient exchange of resnet18 (11.2 M floats, 62 tensors), ms per step\n")
    print("| N | sac fused (GradSync, as a training step) | bucketed allreduce alone | one allreduce per tensor | fused / per-tensor |")
    print("|---|---|---|---|---|")
    for n in sorted({n for (w, i, n) in by if w == "allreduce"}):
        a = by[("allreduce", "sac", n)]
        f, raw, p = [r["fused_ms"] for r in a], [r["raw_ms"] for r in a], [r["per_tensor_ms"] for r in a]
        print(f"| {n} | {fmt(f)} | {fmt(raw)} | {fmt(p)} | {med(f) / med(p):.2f} |")

    print("\n### Evaluation of test.csv (resnet18, 64x64, batch 32)\n")
    base = by[("evaluate", "torch", 1)]
    sac1 = by[("evaluate", "sac", 1)]
    print("| run | images/s | CPU s per image (all ranks) | vs sac single process | busy share: read / decode / normalize / predict |")
    print("|---|---|---|---|---|")
    ips1 = med([r["images_per_second"] for r in sac1])
    cpu1 = med([r["cpu_seconds_per_image"] for r in sac1])
    if base:
        b = [r["images_per_second"] for r in base]
        print(f"| PyTorch batched inference, 1 process | {fmt(b)} | {fmt([r['cpu_seconds_per_image'] for r in base], 4)} | "
              f"{med(b) / ips1:.2f}× speed | – |")
    for n in sorted({n for (w, i, n) in by if w == "evaluate" and i == "sac"}):
        runs = by[("evaluate", "sac", n)]
        ips = [r["images_per_second"] for r in runs]
        cpu = [r["cpu_seconds_per_image"] for r in runs]
        busy = runs[-1]["busy"]
        shares = " / ".join(f"{busy.get(k, 0):.2f}" for k in ("read", "decode", "normalize", "predict"))
        name = "sac, 1 process (stages as threads)" if n == 1 else f"sac pipeline, {n} ranks"
        print(f"| {name} | {fmt(ips)} | {fmt(cpu, 4)} | {med(ips) / ips1:.2f}× speed, {med(cpu) / cpu1:.2f}× CPU | {shares} |")

    print("\n### Decode + resize of 1000x680 JPEGs to 128x128, one thread, images/s\n")
    pil = by[("decode", "pil", 1)]
    sac = by[("decode", "sac", 1)]
    if pil and not sac:
        print(f"PIL {fmt([r['images_per_second'] for r in pil])}, PIL with draft "
              f"{fmt([r['images_per_second_draft'] for r in pil])} (sac's loader not run)")
    if pil and sac:
        p = [r["images_per_second"] for r in pil]
        pd = [r["images_per_second_draft"] for r in pil]
        s = [r["images_per_second"] for r in sac]
        sf = [r["images_per_second_full"] for r in sac]
        print("| PIL | PIL with draft | sac (libjpeg-turbo, reduced DCT scale) | sac, full-size decode (image crate) | sac / PIL draft |")
        print("|---|---|---|---|---|")
        print(f"| {fmt(p)} | {fmt(pd)} | {fmt(s)} | {fmt(sf)} | {med(s) / med(pd):.2f} |")


if __name__ == "__main__":
    main()
