"""Channels-last on the CPU, per architecture: forward + backward of each torchvision model sac
trains, on pre-loaded tensors, one torch thread, in f32 and in bf16 autocast, with the batch in
contiguous (NCHW) or channels-last (NHWC) memory format, the convolution weights in the same
layout as the batch, as sac does it (train.channels_last; with contiguous weights a convolution
converts them at every call, which cost resnet18 4-5 % at 64 px).

What `channels_last = "auto"` decides on a CPU comes from these figures (src/precision.rs).
Rounds are interleaved (every architecture and setting once per round) so that the machine's
drift falls on all of them alike; the median step of each is reported.

`channels_last.py --table FILE...` prints the markdown table of result files.

Prints one JSON object per line:
  {"arch": "resnet18", "size": 64, "precision": "bf16", "channels_last": true, "round": 1,
   "images_per_second": ...}
"""
import argparse
import json
import statistics
import time

ARCHS = ["resnet18", "resnet34", "resnet50", "alexnet", "vgg11_bn", "squeezenet1_0", "densenet121", "inception_v3"]


def measure(arch, size, batch, precision, channels_last, warmup, steps):
    import torch
    import torchvision

    torch.manual_seed(0)
    kw = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    model = getattr(torchvision.models, arch)(num_classes=10, **kw)
    model.train()
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        model.zero_grad(set_to_none=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        loss_fn(out.float(), y).backward()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--size", type=int, default=64, help="input side (inception_v3: at least 75, it gets 80 at 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    import torch

    torch.set_num_threads(1)
    for r in range(1, a.rounds + 1):
        for arch in a.archs.split(","):
            size = max(a.size, 80) if arch == "inception_v3" else a.size
            for precision in ("f32", "bf16"):
                for cl in (False, True):
                    ips = measure(arch, size, a.batch, precision, cl, a.warmup, a.steps)
                    print(json.dumps({"arch": arch, "size": size, "batch": a.batch, "precision": precision,
                                      "channels_last": cl, "round": r, "images_per_second": round(ips, 2),
                                      "torch": torch.__version__}), flush=True)


def table(paths):
    """A markdown table of one or more result files: median images/s (min-max) and the ratio of
    medians, channels-last over contiguous, per architecture, size and precision."""
    rows = [json.loads(l) for p in paths for l in open(p) if l.strip()]
    keys = sorted({(r["arch"], r["size"]) for r in rows}, key=lambda k: (ARCHS.index(k[0]), k[1]))
    out = ["| architecture | px | f32 contiguous | f32 channels-last | ratio | bf16 contiguous | "
           "bf16 channels-last | ratio | bf16 ÷ f32 (contiguous) |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, size in keys:
        fig = {}
        for p in ("f32", "bf16"):
            for cl in (False, True):
                fig[p, cl] = [r["images_per_second"] for r in rows
                              if (r["arch"], r["size"], r["precision"], r["channels_last"]) == (arch, size, p, cl)]
        med = {k: statistics.median(v) for k, v in fig.items()}
        show = lambda k: f"{med[k]:.1f} ({min(fig[k]):.1f}–{max(fig[k]):.1f})"
        out.append(f"| {arch} | {size} | {show(('f32', False))} | {show(('f32', True))} | "
                   f"{med['f32', True] / med['f32', False]:.2f}× | {show(('bf16', False))} | {show(('bf16', True))} | "
                   f"{med['bf16', True] / med['bf16', False]:.2f}× | {med['bf16', False] / med['f32', False]:.2f}× |")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--table":
        print(table(sys.argv[2:]))
    else:
        main()
