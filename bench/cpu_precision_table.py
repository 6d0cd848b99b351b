"""The table of bench/cpu_precision.sh: medians over rounds (min-max beside them) and ratios of
medians, with the targets of the CPU fast path beside each ratio.

usage: cpu_precision_table.py RESULTS.jsonl [CPU.txt]
"""
import json
import statistics
import sys

TARGETS = {"auto_f32": {64: 1.7, 128: 2.0}, "auto_ddp": 1.05, "auto_limit": 0.9}


def fig(v):
    return f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})" if v else "–"


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    if len(sys.argv) > 2:
        lines = open(sys.argv[2]).read().splitlines()
        name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "?")
        flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
        have = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
        print(f"CPU: {name}; flags: {', '.join(have) or 'none of avx512f/avx512_bf16/amx'}\n")
    rounds = max((r.get("round", 1) for r in rows), default=0)
    print(f"images/s, median of {rounds} round(s) (min–max); ratios are ratios of medians.\n")
    print("| px | N | sac f32 | sac auto (resolved) | auto ÷ f32 | DDP f32 | DDP bf16 + channels-last | "
          "auto ÷ best DDP | limit f32 × N | limit bf16 + CL × N | auto ÷ bf16 limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sides = sorted({r["size"] for r in rows if "size" in r})
    for side in sides:
        lim = lambda p: [r["images_per_second"] for r in rows if r["what"] == "compute" and r["size"] == side
                         and r["precision"] == p]
        for n in sorted({r["n"] for r in rows if r["what"] == "train" and r["size"] == side}):
            pick = lambda f: [r["images_per_second"] for r in rows if r["what"] == "train" and r["size"] == side
                              and r["n"] == n and f(r)]
            sf = pick(lambda r: r["impl"] == "sac" and r["asked"] == "f32")
            sa = pick(lambda r: r["impl"] == "sac" and r["asked"] == "auto")
            resolved = sorted({r["precision"] for r in rows if r.get("asked") == "auto" and r["size"] == side})
            df = pick(lambda r: r["impl"] == "ddp" and r["precision"] == "f32")
            db = pick(lambda r: r["impl"] == "ddp" and r["precision"] == "bf16")
            lf, lb = [v * n for v in lim("f32")], [v * n for v in lim("bf16")]
            med = lambda v: statistics.median(v) if v else float("nan")
            best = max(med(df), med(db))
            r1 = med(sa) / med(sf)
            r2 = med(sa) / best
            r3 = med(sa) / med(lb)
            t1 = TARGETS["auto_f32"].get(side)
            print(f"| {side} | {n} | {fig(sf)} | {fig(sa)} ({'/'.join(resolved)}) | {r1:.2f}×"
                  f"{f' (≥ {t1})' if t1 else ''} | {fig(df)} | {fig(db)} | {r2:.2f}× (≥ 1.05) | {fig(lf)} | "
                  f"{fig(lb)} | {r3:.2f}× (≥ 0.9) |")


if __name__ == "__main__":
    main()
