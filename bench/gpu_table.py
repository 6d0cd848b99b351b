"""The summary table of bench/gpu.sh: reads its JSON lines (one object per check) and the CPU
reference (bench/gpu_reference.json), prints a Markdown table with each target and whether it
holds.

    python3 bench/gpu_table.py results/gpu-<time>.jsonl bench/gpu_reference.json
"""
import json
import sys


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt(x, spec=".1f"):
    """A number as `spec`; anything else (a missing figure) as a dash."""
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def verdict(ok):
    return "yes" if ok else "**no**"


def main():
    checks = load(sys.argv[1])
    ref = json.load(open(sys.argv[2])) if len(sys.argv) > 2 else {}
    rows = []
    machine = next((c for c in checks if c["check"] == "machine"), {})
    device = machine.get("device", "cuda")
    print(f"GPU: {machine.get('gpu')}; torch {machine.get('torch')}; CPU: {machine.get('cpu')}, {machine.get('cores')} cores; "
          f"sac bundle {machine.get('bundle')} (built against torch {machine.get('sac_torch')})\n")

    for c in (c for c in checks if c["check"] == "mpi-check"):
        err = c.get("relative_error")
        exact = c.get("ok") is True and isinstance(err, (int, float)) and err <= 1e-5
        rows.append((f"mpi-check on {device}, {c['ranks']} rank(s)",
                     f"relative error {fmt(err, '.1e')}; exchange {fmt(c.get('fused_ms'))} ms, Adam {fmt(c.get('adam_ms'), '.2f')} ms"
                     f" per step (UCX_TLS {c.get('ucx_tls')})",
                     "exact (<= 1e-5)", verdict(exact)))

    # The CPU's figures hold only for the data they were measured on (the bundle's sample).
    same_data = machine.get("sample") == ref.get("sample")
    cpu_ref = ref.get("resnet18_64px", {}) if same_data else {}
    for c in (c for c in checks if c["check"] == "train-resnet18"):
        hist = c.get("history") if isinstance(c.get("history"), list) else []
        losses = [e.get("train_loss") for e in hist]
        top1 = [e.get("top1") for e in hist]
        ips = [e.get("images_per_second") for e in hist]
        falls = len(losses) >= 2 and all(isinstance(x, (int, float)) for x in losses) and losses[-1] < losses[0]
        want = cpu_ref.get(c["precision"], {}).get("top1") if c["ranks"] == 1 else None
        got = top1[-1] if top1 else None
        if want is not None and got is not None and len(hist) == len(want):
            close = abs(got - want[-1]) <= 0.02
            target = f"loss falls; top-1 within 2 points of the CPU's {100 * want[-1]:.2f} %"
        else:
            close = c["ranks"] > 1 or not cpu_ref
            if c["ranks"] > 1:
                target = "loss falls; ends well"
            elif same_data:
                target = "loss falls (no CPU reference)"
            else:
                target = f"loss falls (the CPU reference is for sample {ref.get('sample')}, not {machine.get('sample')})"
        rows.append((f"resnet18 64 px, {c['ranks']} rank(s), {c['precision']}",
                     f"loss {' -> '.join(fmt(x, '.4f') for x in losses)}; top-1 {' -> '.join(fmt(100 * x if x else None, '.2f') for x in top1)} %; "
                     f"{fmt(ips[-1] if ips else None, '.0f')} img/s",
                     target, verdict(c.get("ok") is True and falls and close)))

    limit = {}
    for c in (c for c in checks if c["check"] == "pytorch-limit" and "result" in c):
        r = c["result"] if isinstance(c["result"], dict) else json.loads(c["result"])
        limit[r["what"]] = r
    lim = limit.get("limit", {}).get("images_per_second")
    step = limit.get("limit+step", {}).get("images_per_second")
    side = limit.get("limit", {}).get("size", 224)
    rows.append((f"PyTorch resnet50 {side} px bf16 channels-last",
                 f"forward + backward {fmt(lim, '.0f')} img/s (the limit); with Adam's step {fmt(step, '.0f')} img/s "
                 f"(batch {limit.get('limit', {}).get('batch')})", "-", "-"))
    for c in (c for c in checks if c["check"] == "train-resnet50"):
        hist = c.get("history") if isinstance(c.get("history"), list) else []
        if len(hist) < 2:
            rows.append((f"sac resnet50 {side} px bf16", "did not finish", ">= 0.9x the limit", "**no**"))
            continue
        jpeg, cached = hist[0]["images_per_second"], hist[1]["images_per_second"]
        ratio = cached / lim if lim else None
        threads = c.get("decode_threads") or 0
        rows.append((f"sac resnet50 {side} px bf16, epoch 2 (decode cache)",
                     f"{cached:.0f} img/s = {fmt(ratio, '.2f')}x the limit, {fmt(cached / step if step else None, '.2f')}x "
                     "PyTorch with its step", ">= 0.9x the limit", verdict(ratio is not None and ratio >= 0.9)))
        rows.append((f"sac resnet50 {side} px bf16, epoch 1 (JPEGs {c.get('jpeg_size')})",
                     f"{jpeg:.0f} img/s with {threads} decode thread(s): {fmt(jpeg / threads if threads else None, '.0f')} img/s per thread",
                     "stated", "-"))

    evals = {c["device"]: c for c in checks if c["check"] == "evaluate"}
    agree = next((c.get("agreement") for c in checks if c["check"] == "evaluate-agreement"), None)
    if evals:
        rows.append((f"evaluate, predictor on {device}",
                     f"{fmt(evals.get(device, {}).get('images_per_second'), '.0f')} img/s (cpu: "
                     f"{fmt(evals.get('cpu', {}).get('images_per_second'), '.0f')}); agreement with the CPU "
                     f"{fmt(100 * agree if isinstance(agree, (int, float)) else None, '.2f')} %",
                     ">= 99.5 % agreement", verdict(isinstance(agree, (int, float)) and agree >= 0.995)))

    print("| check | measured | target | holds |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
