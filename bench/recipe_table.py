"""Turns bench/recipe.sh's results (bench/results/recipe-<timestamp>.json) into the Markdown table
"sac vs PyTorch, plain and full recipe" of BENCHMARKS.md.

Input: a JSON list of runs, {"framework": "sac" | "pytorch", "recipe", "seed", "precision", "epochs",
"top1", "top5", "seconds"}, top1/top5 as fractions; a run without "precision" is an f32 run.
One row per (recipe, framework, precision): the mean test top-1
over the seeds ± its sample standard deviation (n - 1), the per-seed values in seed order, the mean
top-5, the mean wall time of a run, and on the sac row the difference of the means sac − PyTorch
in percentage points, ± the standard error of that difference (sqrt(s_sac²/n_sac + s_pt²/n_pt));
the seeds do not pair runs across frameworks (their generators differ), so the difference is of
means, not a paired one. sac rows of another precision than f32 also get the difference of their
mean to sac f32's (same recipe), with the same standard error, and the paired per-seed differences
(the same seed gives the same initial weights and data order in both precisions).

  .venv/bin/python bench/recipe_table.py bench/results/recipe-<timestamp>.json \\
      [--command "bench/recipe.sh ..."] [--machine "CPU, N cores"] [--note TEXT]...
"""
import argparse
import json
import math
import statistics
import sys

FRAMEWORKS = {"sac": "sac", "pytorch": "PyTorch"}
RECIPE_ORDER = ["plain", "full"]


def mean_std(values):
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else None)


def pct(x, std=None, digits=2):
    s = f"{100 * x:.{digits}f}"
    return s + (f" ± {100 * std:.{digits}f}" if std is not None else "") + " %"


def duration(seconds):
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def difference(a, b):
    """The difference of the means of two (mean_std, n) in points, ± its standard error."""
    ((ma, sa), na), ((mb, sb), nb) = a, b
    out = f"{100 * (ma - mb):+.2f}"
    if sa is not None and sb is not None:
        out += f" ± {100 * math.sqrt(sa * sa / na + sb * sb / nb):.2f}"
    return out


def precision_of(run):
    return run.get("precision", "f32")


def table(runs, command=None, machine=None, notes=()):
    groups = {}
    for r in runs:
        fw = r["framework"] if r["framework"] != "sac" else ("sac", precision_of(r))
        groups.setdefault((r["recipe"], fw), []).append(r)
    recipes = sorted({r for r, _ in groups}, key=lambda r: (RECIPE_ORDER.index(r) if r in RECIPE_ORDER else 99, r))
    sac_precisions = sorted({precision_of(r) for r in runs if r["framework"] == "sac"},
                            key=lambda p: (p != "f32", p))
    row_keys = [("sac", p) for p in sac_precisions] + ["pytorch"]
    mixed = sac_precisions != ["f32"]
    seeds = sorted({r["seed"] for r in runs})
    epochs = sorted({r["epochs"] for r in runs})
    lines = [
        f"sac vs PyTorch, {' and '.join(recipes)} recipe, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), "
        f"{'/'.join(map(str, epochs))} epoch(s): test top-1 after the last epoch",
        "",
        "| recipe | framework | top-1, mean ± std | top-1 per seed | top-5, mean | sac − PyTorch (points) |"
        + (" − sac f32 (points; per seed) |" if mixed else "") + " time per run |",
        "|---|---|---:|---|---:|---:|" + ("---:|" if mixed else "") + "---:|",
    ]
    if mixed:
        lines[0] = lines[0].replace("sac vs PyTorch", "sac in " + ", ".join(sac_precisions) + " vs PyTorch")
    for recipe in recipes:
        stats = {}
        for fw in row_keys:
            rs = sorted(groups.get((recipe, fw), []), key=lambda r: r["seed"])
            if rs:
                stats[fw] = (mean_std([r["top1"] for r in rs]), len(rs))
        for fw in row_keys:
            name = FRAMEWORKS[fw] if isinstance(fw, str) else f"sac {fw[1]}" if mixed else "sac"
            rs = sorted(groups.get((recipe, fw), []), key=lambda r: r["seed"])
            if not rs:
                if fw in stats or fw == "pytorch" and any(isinstance(k, str) for _, k in groups):
                    lines.append(f"| {recipe} | {name} | – | – | – | – |" + (" – |" if mixed else "") + " – |")
                continue
            (m, s), _ = stats[fw]
            per_seed = ", ".join(f"{100 * r['top1']:.2f}" for r in rs)
            top5 = statistics.fmean(r["top5"] for r in rs if r["top5"] is not None) if any(
                r["top5"] is not None for r in rs) else None
            diff = "–"
            if fw != "pytorch" and "pytorch" in stats:
                diff = difference(stats[fw], stats["pytorch"])
            vs_f32 = ""
            if mixed:
                vs_f32 = " – |"
                f32 = ("sac", "f32")
                if fw != "pytorch" and fw != f32 and f32 in stats:
                    by_seed = {r["seed"]: r["top1"] for r in groups[(recipe, f32)]}
                    paired = ", ".join(f"{100 * (r['top1'] - by_seed[r['seed']]):+.2f}" for r in rs
                                       if r["seed"] in by_seed)
                    vs_f32 = f" {difference(stats[fw], stats[f32])}; {paired} |"
            secs = statistics.fmean(r["seconds"] for r in rs)
            lines.append(f"| {recipe} | {name} | {pct(m, s)} | {per_seed} | "
                         f"{pct(top5) if top5 is not None else '–'} | {diff} |{vs_f32} {duration(secs)} |")
    lines.append("")
    lines.append("std: sample standard deviation over the seeds; sac − PyTorch: difference of the means, "
                 "± the standard error of that difference."
                 + (" − sac f32: the same against sac's f32 runs, then the per-seed differences (paired: "
                    "a seed gives both precisions the same initial weights and data order)." if mixed else ""))
    for n in notes:
        lines.append(n)
    if command:
        lines.append(f"Command: `{command}`")
    if machine:
        lines.append(f"Machine: {machine}")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="bench/results/recipe-<timestamp>.json")
    p.add_argument("--command", help="the command line that produced the results")
    p.add_argument("--machine", help="e.g. 'CPU model, N cores'")
    p.add_argument("--note", action="append", default=[], help="a line printed under the table (repeatable)")
    a = p.parse_args(argv)
    with open(a.results) as f:
        runs = json.load(f)
    if not runs:
        print(f"recipe_table.py: {a.results}: no runs", file=sys.stderr)
        return 1
    sys.stdout.write(table(runs, a.command, a.machine, a.note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
