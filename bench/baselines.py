"""The baselines sac is measured against, written for the "bench-fmnist" workload (DESIGN.md).

Each subcommand prints one JSON line on stdout (rank 0 only), read by bench/run.sh:

  ddp       PyTorch DistributedDataParallel training (gloo, CPU), launched by torchrun:
            PIL decode, torchvision Resize/ToTensor/Normalize, DistributedSampler, one thread
            per rank, resnet18 from scratch, Adam, one epoch over data/train.csv
            (--compress bf16: gradients exchanged as bfloat16 by DDP's bf16_compress_hook;
            --precision bf16: forward under torch.autocast("cpu", torch.bfloat16), as PyTorch's
            performance guide advises; --channels-last: model and batches in channels-last)
  compute   the compute limit: one process, pre-loaded random tensors, forward + backward +
            Adam step of the model (--no-step: forward + backward alone), no data loading, no
            communication; --precision and --channels-last as for ddp
  infer     PyTorch batched inference over data/test.csv in one process (PIL + transforms),
            with sac's checkpoint loaded into the torchvision model
  decode    PIL decode + resize of JPEG files, with and without Image.draft
  jpegs     writes synthetic 1000x680 JPEGs (herbarium-sheet sized) for the decode benchmark
"""
import argparse
import csv
import json
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


def usage():
    """Peak RSS (MiB) and CPU seconds (user + system) of this process."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_maxrss / 1024.0, ru.ru_utime + ru.ru_stime


class CsvImages(torch.utils.data.Dataset):
    """The rows of a sac split CSV, decoded with PIL."""

    def __init__(self, data_dir, split, size):
        with open(os.path.join(data_dir, split), newline="") as f:
            self.rows = [(r["path"], int(r["label"])) for r in csv.DictReader(f)]
        self.data_dir = data_dir
        self.tf = transforms.Compose(
            [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        )

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        path, label = self.rows[i]
        with Image.open(os.path.join(self.data_dir, path)) as img:
            return self.tf(img.convert("RGB")), label


def classes(data_dir):
    with open(os.path.join(data_dir, "classes.csv"), newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def ddp(a):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    import datetime

    # Loopback only, and a bounded wait: a peer that never connects fails the run instead of
    # holding it for gloo's default 30 minutes.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=a.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    ds = CsvImages(a.data, "train.csv", a.size)
    sampler = DistributedSampler(ds, shuffle=True, seed=a.seed)
    sampler.set_epoch(0)
    loader = DataLoader(ds, batch_size=a.batch, sampler=sampler, num_workers=0)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    net = torchvision.models.resnet18(num_classes=classes(a.data)).to(memory_format=fmt)
    model = DistributedDataParallel(net)
    if a.compress == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    dist.barrier()
    t0 = time.perf_counter()
    seen = 0
    for _ in range(a.epochs):
        for x, y in loader:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                out = model(x.contiguous(memory_format=fmt))
            F.cross_entropy(out.float(), y).backward()
            opt.step()
            seen += len(y)
    dist.barrier()
    wall = time.perf_counter() - t0
    total = torch.tensor([seen], dtype=torch.float64)
    dist.all_reduce(total)
    rss, cpu = usage()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (rss, cpu))
    if rank == 0:
        images = total.item()
        print(json.dumps({
            "what": "train", "impl": "ddp", "n": world, "images": images, "compress": a.compress,
            "precision": a.precision, "channels_last": a.channels_last, "size": a.size,
            "images_per_second": images / wall, "seconds": wall,
            "peak_rss_mib": [r for r, _ in per_rank],
            "cpu_seconds_per_image": sum(c for _, c in per_rank) / images,
        }), flush=True)
    # Not dist.destroy_process_group(): with gloo it sometimes never returns on the rank whose peer
    # has already left (seen here: rank 0 printed its result, then hung there until the step's
    # time bound). All collectives are done once every rank passes this barrier: leave at once.
    # Rank 0 leaves first, so no peer closes a connection it may still be reading.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    if rank != 0:
        time.sleep(0.5)
    os._exit(0)


def compute(a):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = torchvision.models.resnet18(num_classes=10).to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    x = torch.randn(a.batch, 3, a.size, a.size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (a.batch,))

    def step():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        if not a.no_step:
            opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    wall = time.perf_counter() - t0
    print(json.dumps({"what": "compute", "impl": "torch-fwd-bwd" if a.no_step else "torch", "n": 1,
                      "precision": a.precision, "channels_last": a.channels_last, "size": a.size,
                      "images_per_second": a.steps * a.batch / wall}), flush=True)


def infer(a):
    from safetensors.torch import load_file
    from torch.utils.data import DataLoader

    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    _, cpu0 = usage()
    model = torchvision.models.resnet18(num_classes=classes(a.data))
    model.load_state_dict(load_file(a.checkpoint))
    model.eval()
    ds = CsvImages(a.data, "test.csv", a.size)
    loader = DataLoader(ds, batch_size=a.batch, num_workers=0)
    t0 = time.perf_counter()
    _, cpu1 = usage()
    hits = n = 0
    with torch.no_grad():
        for x, y in loader:
            hits += (model(x).argmax(1) == y).sum().item()
            n += len(y)
    wall = time.perf_counter() - t0
    rss, cpu2 = usage()
    print(json.dumps({"what": "evaluate", "impl": "torch", "n": 1, "images": n, "top1": hits / n,
                      "images_per_second": n / wall, "cpu_seconds_per_image": (cpu2 - cpu1) / n,
                      "peak_rss_mib": [rss], "startup_seconds": t0 - t_start}), flush=True)


def decode(a):
    files = sorted(os.path.join(a.dir, f) for f in os.listdir(a.dir) if f.endswith(".jpg"))
    out = {"what": "decode", "impl": "pil", "n": 1, "images": len(files)}
    for draft in (False, True):
        # One untimed pass (page cache, libraries), then the median of three timed ones; sac's
        # benches/decode.rs does the same.
        rates = []
        for rep in range(4):
            t0 = time.perf_counter()
            for f in files:
                with Image.open(f) as img:
                    if draft:
                        img.draft("RGB", (a.size, a.size))
                    img.convert("RGB").resize((a.size, a.size), Image.BILINEAR)
            if rep:
                rates.append(len(files) / (time.perf_counter() - t0))
        out["images_per_second_draft" if draft else "images_per_second"] = sorted(rates)[1]
    print(json.dumps(out), flush=True)


def jpegs(a):
    """Herbarium-sheet-like JPEGs: smooth gradients with some texture, quality 90."""
    import numpy as np

    os.makedirs(a.dir, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:680, 0:1000]
    for i in range(a.count):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2 + i) % 256, ((xx + yy) // 3) % 256], axis=-1)
        noise = rng.integers(0, 40, size=base.shape)
        img = Image.fromarray(((base + noise) % 256).astype("uint8"), "RGB")
        img.save(os.path.join(a.dir, f"{i:04d}.jpg"), quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("ddp", "compute", "infer"):
        s = sub.add_parser(name)
        s.add_argument("--data", default="data")
        s.add_argument("--size", type=int, default=64)
        s.add_argument("--batch", type=int, default=64)
        s.add_argument("--lr", type=float, default=4e-4)
        s.add_argument("--epochs", type=int, default=1)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--steps", type=int, default=20)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--checkpoint", default="")
        s.add_argument("--timeout", type=int, default=300, help="seconds to wait for a peer (ddp)")
        s.add_argument("--no-step", action="store_true", help="compute: forward + backward only, no optimizer step")
        s.add_argument("--precision", choices=["f32", "bf16"], default="f32",
                       help="ddp, compute: f32, or the forward under bfloat16 autocast")
        s.add_argument("--channels-last", action="store_true", help="ddp, compute: channels-last model and batches")
        s.add_argument("--compress", choices=["none", "bf16"], default="none",
                       help="ddp: exchange gradients as they are or as bfloat16 (bf16_compress_hook)")
    s = sub.add_parser("decode")
    s.add_argument("--dir", required=True)
    s.add_argument("--size", type=int, default=128)
    s = sub.add_parser("jpegs")
    s.add_argument("--dir", required=True)
    s.add_argument("--count", type=int, default=100)
    a = p.parse_args()
    {"ddp": ddp, "compute": compute, "infer": infer, "decode": decode, "jpegs": jpegs}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
