"""PyTorch's compute limit on one GPU: forward + backward of a torchvision model on pre-loaded
tensors (no data loading, no communication), and the same with the optimizer step beside it.

The figure sac's training is held to in bench/gpu.sh: the model, input size, batch and precision
are the ones sac trains with there. bf16 is torch.autocast(dtype=torch.bfloat16) with f32 weights,
as sac's train.precision = "bf16"; --channels-last puts model and batch in channels-last memory
format, as PyTorch's performance guide advises for convolutions with tensor cores.

Prints one JSON object per line:
  {"what": "limit", "images_per_second": ..., "step_ms": ..., ...}       forward + backward
  {"what": "limit+step", ...}                                             + Adam's step (foreach)
"""
import argparse
import json
import statistics
import time

import torch
import torchvision


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50", help="a torchvision constructor (default resnet50)")
    p.add_argument("--size", type=int, default=224, help="square input side (default 224)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--precision", choices=["f32", "bf16"], default="bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotuning)")
    p.add_argument("--steps", type=int, default=30, help="timed steps; the median is reported")
    p.add_argument("--device", default="cuda")
    a = p.parse_args()

    torch.backends.cudnn.benchmark = True
    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(num_classes=a.classes).to(dev)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    model.train()
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev).to(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch,), device=dev)
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(with_optimizer):
        model.zero_grad(set_to_none=False)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            out = model(x)
        loss = loss_fn(out.float(), y)
        loss.backward()
        if with_optimizer:
            opt.step()

    results = []
    for what, with_optimizer in (("limit", False), ("limit+step", True)):
        for _ in range(a.warmup):
            step(with_optimizer)
        sync()
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            step(with_optimizer)
            sync()
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        results.append(
            {
                "what": what,
                "model": a.model,
                "size": a.size,
                "batch": a.batch,
                "precision": a.precision,
                "channels_last": a.channels_last,
                "step_ms": round(1e3 * med, 3),
                "images_per_second": round(a.batch / med, 1),
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            }
        )
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
