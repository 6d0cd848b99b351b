"""PyTorch baseline of sac's training recipes: torchvision's resnet18 trained on a sac data dir.

This is the PyTorch side of the recipe table in BENCHMARKS.md: sac and PyTorch trained on the same
data dir (the train.csv / test.csv that `sac create-dataset` wrote), with the same optimizer, lr
schedule, regularisation and augmentation family, so that their accuracies can be set side by
side. The recipe follows torchvision's classification reference script (references/
classification/train.py): torchvision.models.resnet18(num_classes=K) with torchvision's own
initialisation, trained from scratch on the CPU, in one process or (--ddp, under torchrun) as
DistributedDataParallel over gloo, the way the reference script runs on many devices. The
defaults are sac's "plain" recipe (Adam, lr 4e-4, constant lr, no augmentation, images stretched
to 64x64).

Run (from the repository root, on a data dir made by `sac create-dataset`):

  .venv/bin/python bench/recipe_torch.py --data-dir data --out bench/results/recipe_torch.json
  .venv/bin/python bench/recipe_torch.py --data-dir data --optimizer sgd --lr 0.5 --nesterov \\
      --weight-decay 1e-4 --norm-weight-decay 0 --lr-schedule cosine --warmup-epochs 1 \\
      --label-smoothing 0.1 --random-resized-crop --rrc-scale 0.35 1 --hflip --resize center_crop \\
      --lr-scaling linear --out recipe_sgd.json          # bench/recipe.sh's "full" recipe
  .venv/bin/python bench/recipe_torch.py --data-dir data --trivial-augment --random-erase 0.1 \\
      --mixup-alpha 0.2 --cutmix-alpha 1.0 --ema-decay 0.9998 --sampler sqrt --resize pad
  .venv/bin/python bench/recipe_torch.py --data-dir data --lr-schedule cosine --print-lr 20
  .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 bench/recipe_torch.py \
      --ddp --threads 1 --batch-size 64 --data-dir data   # 2 processes, 64 images each per step

DDP (--ddp; torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT): every process builds the model
(DDP broadcasts rank 0's weights), --batch-size is per process, so the global batch is
batch-size x world size (what --lr-scaling linear scales by), and batch-norm normalises over each
process's own batch, as sac's ranks do (no SyncBatchNorm, as in the reference script by default).
Every process draws the same epoch order (below) and takes every world-th index of it from its
rank on (torch's DistributedSampler; the order is cut to a multiple of the world size first), so
the processes' images are disjoint and their step counts equal. Augmentation draws from torch's
global generator, seeded with seed + rank. Rank 0 alone evaluates and writes --out; the training
loss is averaged over all processes.

Input: <data_dir>/train.csv and test.csv (columns path, relative to the data dir, and label in
0..K-1; other columns are ignored), <data_dir>/classes.csv (one row per class: K). Images are
decoded with PIL, converted to RGB and kept in memory after their first read (--no-cache turns
that off for sources too large to hold).

Data order: every epoch a list of image indices drawn from a torch.Generator seeded with seed +
epoch (epoch counted from 0), cut into consecutive runs of --batch-size images; a last run of a
single image joins the run before it, as sac does (batch-norm cannot take a batch of one).
  --sampler uniform:        torch.randperm (every image once)
  --sampler class_balanced: torch.utils.data.WeightedRandomSampler(weights, num_samples = the number
                            of training images, replacement=True, generator), weight 1/n for an
                            image of a class with n training images
  --sampler sqrt:           likewise with weight 1/sqrt(n)
An image drawn twice in an epoch is augmented anew each time.

Learning rate, set before every optimizer step (per step, not per epoch) through
torch.optim.lr_scheduler.LambdaLR with factor lr(t) / base:

  base = --lr, times the global batch (batch_size x world size) / 256 with --lr-scaling linear
  S    = steps per epoch (the number of runs above), T = epochs * S, W = warmup_epochs * S
  t    = 0-based index of the step about to be taken
  t < W:      lr(t) = base * (warmup_decay + (1 - warmup_decay) * t / W)
  otherwise,  u = t - W, and
    constant: lr(t) = base
    step:     lr(t) = base * gamma ** floor(u / (step_size * S))
    cosine:   lr(t) = lr_min + (base - lr_min) * (1 + cos(pi * u / max(1, T - W))) / 2

Weight decay: as train.py's --norm-weight-decay (torchvision.ops._utils.split_normalization_params)
but, as sac does ("weight decay for batch-norm and bias parameters"), biases join the norm group:
the parameters of normalisation layers (batch/group/layer/instance norm) AND every parameter whose
name ends in ".bias" get --norm-weight-decay; all others get --weight-decay. With Adam the decay is
the L2 term torch.optim.Adam adds to the gradient; with AdamW it is decoupled.

Resizing, --resize (torchvision.transforms.v2 on PIL images, bilinear, antialias=True): how a whole
image becomes width x height, for evaluation and for training without --random-resized-crop:
  stretch:     Resize((H, W)), each side on its own
  center_crop: torchvision's evaluation transform: Resize(val_resize) (an int: the SHORT side to
               val_resize, aspect kept, the long side int(val_resize * long / short)), then
               CenterCrop((H, W)); val_resize = --val-resize-size if > 0, else
               int(max(W, H) / 0.875) (73 for 64)
  pad:         the whole image fitted inside W x H with its aspect kept (scale = min(W / w, H / h),
               the scaled size rounded half up, at least 1 px), centred (offsets floored) on a
               canvas of the mean colour round(mean * 255) per channel (0 after Normalize)

Training transforms, in torchvision's reference order:
  RandomResizedCrop((H, W), --rrc-scale, --rrc-ratio) from the whole image with
  --random-resized-crop, else the --resize transform above; RandomHorizontalFlip(0.5) with
  --hflip; RandomVerticalFlip(0.5) with --vflip; TrivialAugmentWide(interpolation=NEAREST) with
  --trivial-augment; to float in [0, 1] and Normalize; RandomErasing(p=P, value=0) with
  --random-erase P.
Evaluation transforms: the --resize transform, to float, Normalize.
Normalize uses ImageNet's mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).

Batch-level (torchvision's reference get_mixup_cutmix): with --mixup-alpha A > 0,
v2.MixUp(alpha=A, num_classes=K); with --cutmix-alpha A > 0, v2.CutMix(alpha=A, num_classes=K);
with both, v2.RandomChoice of the two (one per batch). Applied to every training batch; the
targets become soft (N x K) and go to the same CrossEntropyLoss(label_smoothing=...), which takes
class probabilities.

Moving average (--ema-decay D > 0): torch.optim.swa_utils.AveragedModel(model,
multi_avg_fn=get_ema_multi_avg_fn(D), use_buffers=True), weights and batch-norm buffers. It starts
as the initial weights (as sac's does) and is updated after every optimizer step: ema = D * ema +
(1 - D) * weights; during the lr warmup (step t < W) n_averaged is set to 0 before the update, so
the update copies the weights (torchvision's reference resets it per warmup epoch; here, as in
sac, per step). The average is evaluated after every epoch as well (ema_top1).

Every epoch trains (train loss = mean over images of the training criterion, label smoothing
included), then evaluates on test.csv: test loss (plain cross-entropy, no label smoothing, so it
compares with sac's val loss), top-1 and top-5 (top-k with k = min(5, K)). One line per epoch goes
to stderr; --out FILE gets JSON, rewritten atomically (FILE.tmp then rename) after every epoch:

  {"recipe": {every option}, "run": {derived numbers, versions},
   "epochs": [{"epoch", "train_loss", "test_loss", "top1", "top5", "ema_top1", "lr_end", "seconds",
               "images_per_second"}, ...],
   "final": {"top1", "top5", "ema_top1"}}          (null until the last epoch is done)

top1, top5 and ema_top1 (the moving average's top-1; null without --ema-decay) are fractions in
[0, 1] (as in sac's metrics); lr_end is the lr of the epoch's last step; seconds is the epoch's
wall time (training + evaluation, the average's included); images_per_second is training images
over training seconds. Missing inputs (data dir, CSV, image) end the script with exit
status 2 and a message naming the file.
"""
import argparse
import csv
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision.transforms import v2

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NORM_CLASSES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def fail(msg):
    """Ends the script with exit status 2 (bad input) and a message."""
    print(f"recipe_torch.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train torchvision's resnet18 on a sac data dir with torchvision's reference "
        "recipe (the PyTorch side of BENCHMARKS.md's recipe table). Defaults are sac's plain recipe.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data and run")
    g.add_argument("--data-dir", required=True, help="a sac data dir: train.csv, test.csv, classes.csv, images")
    g.add_argument("--out", help="write the results as JSON here (atomically, after every epoch)")
    g.add_argument("--epochs", type=int, default=15, help="epochs to train")
    g.add_argument("--batch-size", type=int, default=128, help="batch size per process (the global batch with one process)")
    g.add_argument("--ddp", action="store_true",
                   help="run as DistributedDataParallel over gloo, one process per rank (start with torchrun)")
    g.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    g.add_argument("--seed", type=int, default=0, help="seeds torch, random and numpy; epoch e shuffles with seed + e")
    g.add_argument("--width", type=int, default=64, help="network input width")
    g.add_argument("--height", type=int, default=64, help="network input height")
    g.add_argument("--no-cache", action="store_true", help="decode images on every read instead of keeping them in memory")
    g.add_argument("--print-lr", type=int, default=0, metavar="N",
                   help="debug: print the lr of the first N steps (through the real LambdaLR) and exit without training")

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="adam", help="optimizer")
    g.add_argument("--lr", type=float, default=4e-4, help="base learning rate (before --lr-scaling)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of all but norm and bias parameters")
    g.add_argument("--norm-weight-decay", type=float, default=None,
                   help="weight decay of normalisation-layer parameters and of every *.bias (default: --weight-decay)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="nn.CrossEntropyLoss(label_smoothing=...) in training")
    g.add_argument("--clip-grad-norm", type=float, default=0.0, help="clip the gradient's total norm to this (0 = off)")

    g = p.add_argument_group("lr schedule (per step)")
    g.add_argument("--lr-schedule", choices=["constant", "step", "cosine"], default="constant", help="schedule after warm-up")
    g.add_argument("--warmup-epochs", type=int, default=0, help="epochs of linear warm-up")
    g.add_argument("--warmup-decay", type=float, default=0.01, help="lr factor at the first warm-up step")
    g.add_argument("--lr-step-size", type=int, default=30, help="step schedule: epochs between lr drops")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="step schedule: factor of each drop")
    g.add_argument("--lr-min", type=float, default=0.0, help="cosine schedule: the lr it ends at")
    g.add_argument("--lr-scaling", choices=["none", "linear"], default="none", help="linear: lr *= global batch / 256")

    g = p.add_argument_group("augmentation and resizing")
    g.add_argument("--random-resized-crop", action="store_true", help="train: RandomResizedCrop to width x height instead of a stretch")
    g.add_argument("--rrc-scale", type=float, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"), help="RandomResizedCrop scale")
    g.add_argument("--rrc-ratio", type=float, nargs=2, default=[0.75, 4.0 / 3.0], metavar=("MIN", "MAX"), help="RandomResizedCrop ratio")
    g.add_argument("--hflip", action="store_true", help="train: random horizontal flip (p = 0.5)")
    g.add_argument("--vflip", action="store_true", help="train: random vertical flip (p = 0.5)")
    g.add_argument("--resize", choices=["stretch", "center_crop", "pad"], default="stretch",
                   help="how a whole image becomes width x height (evaluation, and training without "
                   "--random-resized-crop): stretch; center_crop = short side to the --val-resize-size, then the "
                   "centre; pad = fit inside with the aspect kept, the rest the mean colour")
    g.add_argument("--val-resize-size", type=int, default=0,
                   help="center_crop: the short side before the crop; 0 = int(max(width, height) / 0.875)")
    g.add_argument("--trivial-augment", action="store_true",
                   help="train: TrivialAugmentWide(interpolation=NEAREST), after the flips")
    g.add_argument("--random-erase", type=float, default=0.0, metavar="P",
                   help="train: RandomErasing(p=P, value=0) after Normalize (0 = off)")
    g.add_argument("--mixup-alpha", type=float, default=0.0, help="train: v2.MixUp(alpha) of every batch (0 = off)")
    g.add_argument("--cutmix-alpha", type=float, default=0.0,
                   help="train: v2.CutMix(alpha) of every batch (0 = off); with both on, one of the two per batch")

    g = p.add_argument_group("sampling and averaging")
    g.add_argument("--sampler", choices=["uniform", "class_balanced", "sqrt"], default="uniform",
                   help="uniform: every image once per epoch; class_balanced / sqrt: as many draws as images, with "
                   "replacement, weight 1/n or 1/sqrt(n) for an image of a class of n training images")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="per-step decay of an AveragedModel (EMA of weights and buffers), evaluated too (0 = off)")

    a = p.parse_args(argv)
    if a.norm_weight_decay is None:
        a.norm_weight_decay = a.weight_decay
    checks = [
        (a.epochs >= 1, "--epochs must be at least 1"),
        (a.batch_size >= 1, "--batch-size must be at least 1"),
        (a.threads >= 1, "--threads must be at least 1"),
        (a.width >= 1 and a.height >= 1, "--width and --height must be at least 1"),
        (a.lr > 0, "--lr must be positive"),
        (a.warmup_epochs >= 0, "--warmup-epochs must not be negative"),
        (a.lr_step_size >= 1, "--lr-step-size must be at least 1"),
        (0 <= a.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (a.clip_grad_norm >= 0, "--clip-grad-norm must not be negative"),
        (not a.nesterov or a.optimizer == "sgd", "--nesterov applies to --optimizer sgd only"),
        (not a.nesterov or a.momentum > 0, "--nesterov needs --momentum > 0"),
        (a.print_lr >= 0, "--print-lr must not be negative"),
        (a.val_resize_size >= 0, "--val-resize-size must not be negative"),
        (0 <= a.random_erase <= 1, "--random-erase must be in [0, 1]"),
        (a.mixup_alpha >= 0 and a.cutmix_alpha >= 0, "--mixup-alpha and --cutmix-alpha must not be negative"),
        (0 <= a.ema_decay < 1, "--ema-decay must be in [0, 1)"),
        (0 < a.rrc_scale[0] <= a.rrc_scale[1], "--rrc-scale must be 0 < MIN <= MAX"),
    ]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    a.rank, a.world = 0, 1
    if a.ddp:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            p.error("--ddp needs torchrun's RANK and WORLD_SIZE (run it with python -m torch.distributed.run)")
        a.rank, a.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return a


# ----------------------------------------------------------------------------- data


def read_csv(path, required):
    """The rows of a CSV as dicts; exit 2 naming the file if it is missing or lacks a column."""
    if not os.path.isfile(path):
        fail(f"{path}: no such file")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            fail(f"{path}: missing column(s) {', '.join(missing)} (header: {reader.fieldnames})")
        return list(reader)


def read_split(data_dir, name, classes):
    """(absolute image paths, labels) of train.csv or test.csv, every label checked against K."""
    path = os.path.join(data_dir, name)
    paths, labels = [], []
    for i, row in enumerate(read_csv(path, ["path", "label"]), start=2):
        try:
            label = int(row["label"])
        except ValueError:
            fail(f"{path}, line {i}: label {row['label']!r} is not an integer")
        if not 0 <= label < classes:
            fail(f"{path}, line {i}: label {label} is outside 0..{classes - 1} (classes.csv has {classes} rows)")
        paths.append(os.path.join(data_dir, row["path"]))
        labels.append(label)
    return paths, labels


class Images:
    """The images of one split, decoded to RGB on first use and (unless cache is off) kept."""

    def __init__(self, paths, labels, cache):
        self.paths, self.labels = paths, labels
        self.cache = {} if cache else None

    def __len__(self):
        return len(self.paths)

    def check(self):
        for p in self.paths:
            if not os.path.isfile(p):
                fail(f"{p}: no such image file")

    def image(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except FileNotFoundError:
            fail(f"{path}: no such image file")
        except OSError as e:
            fail(f"{path}: cannot decode image: {e}")
        if self.cache is not None:
            self.cache[i] = img
        return img

    def batch(self, idx, transform):
        x = torch.stack([transform(self.image(i)) for i in idx])
        y = torch.tensor([self.labels[i] for i in idx], dtype=torch.long)
        return x, y


def batch_bounds(n, batch):
    """Consecutive runs of `batch` over n items; a last run of one item joins the one before it."""
    runs = [[lo, min(lo + batch, n)] for lo in range(0, n, batch)]
    if batch > 1 and len(runs) > 1 and runs[-1][1] - runs[-1][0] == 1:
        last = runs.pop()
        runs[-1][1] = last[1]
    return runs


def round_half_up(x):
    """Rounds halves away from zero (x >= 0), as Rust's f64::round in sac (Python's round() is banker's)."""
    return int(math.floor(x + 0.5))


def val_resize(a):
    """center_crop's short side: --val-resize-size, or int(max(width, height) / 0.875) (73 for 64)."""
    return a.val_resize_size if a.val_resize_size > 0 else int(max(a.width, a.height) / 0.875)


class Pad:
    """The whole image fitted inside width x height with its aspect kept (scaled size rounded, at
    least 1 px), bilinear with antialiasing, centred (offsets floored), the rest filled with the
    mean colour round(mean * 255) (0 after Normalize), as sac's image.resize = "pad". PIL in, PIL out."""

    def __init__(self, width, height, mean):
        self.width, self.height = width, height
        self.fill = tuple(min(255, max(0, round_half_up(m * 255))) for m in mean)

    def __call__(self, img):
        w, h = img.size
        scale = min(self.width / w, self.height / h)
        rw = min(max(round_half_up(w * scale), 1), self.width)
        rh = min(max(round_half_up(h * scale), 1), self.height)
        if (rw, rh) != (w, h):
            img = v2.functional.resize(img, [rh, rw], antialias=True)
        out = Image.new("RGB", (self.width, self.height), self.fill)
        out.paste(img, ((self.width - rw) // 2, (self.height - rh) // 2))
        return out

    def __repr__(self):
        return f"Pad(size=({self.height}, {self.width}), fill={self.fill})"


def fit(a):
    """--resize as transforms: a whole image made height x width (PIL in, PIL out)."""
    size = (a.height, a.width)
    if a.resize == "center_crop":
        # torchvision's evaluation transform: Resize(int) brings the SHORT side to val_resize
        # (aspect kept), then CenterCrop.
        return [v2.Resize(val_resize(a), antialias=True), v2.CenterCrop(size)]
    if a.resize == "pad":
        return [Pad(a.width, a.height, MEAN)]
    return [v2.Resize(size, antialias=True)]


def transforms(a):
    """(train, test) per-image transforms; see the module docstring."""
    size = (a.height, a.width)
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if a.random_resized_crop:
        train = [v2.RandomResizedCrop(size, scale=tuple(a.rrc_scale), ratio=tuple(a.rrc_ratio), antialias=True)]
    else:
        train = fit(a)
    if a.hflip:
        train.append(v2.RandomHorizontalFlip(0.5))
    if a.vflip:
        train.append(v2.RandomVerticalFlip(0.5))
    if a.trivial_augment:
        train.append(v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.NEAREST))
    train += tail
    if a.random_erase > 0:
        train.append(v2.RandomErasing(p=a.random_erase, value=0))
    return v2.Compose(train), v2.Compose(fit(a) + tail)


def batch_mix(a, classes):
    """torchvision's reference get_mixup_cutmix: MixUp and/or CutMix (one chosen per batch when both
    are on) with soft targets over `classes`; None when both alphas are 0."""
    mix = []
    if a.mixup_alpha > 0:
        mix.append(v2.MixUp(alpha=a.mixup_alpha, num_classes=classes))
    if a.cutmix_alpha > 0:
        mix.append(v2.CutMix(alpha=a.cutmix_alpha, num_classes=classes))
    return v2.RandomChoice(mix) if mix else None


def sampling_weights(a, labels):
    """Per-image weights of --sampler class_balanced (1/n) or sqrt (1/sqrt(n)); None for uniform."""
    if a.sampler == "uniform":
        return None
    counts = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    f = (lambda n: 1.0 / n) if a.sampler == "class_balanced" else (lambda n: 1.0 / math.sqrt(n))
    return torch.tensor([f(counts[y]) for y in labels], dtype=torch.double)


def epoch_order(a, n, epoch, weights):
    """This process's image indices of one epoch: the order drawn from a generator seeded with
    seed + epoch, cut to a multiple of the world size, every world-th from the rank on."""
    g = torch.Generator()
    g.manual_seed(a.seed + epoch)
    if weights is None:
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(torch.utils.data.WeightedRandomSampler(weights, num_samples=n, replacement=True, generator=g))
    return order[: len(order) - len(order) % a.world][a.rank :: a.world]


def steps_per_epoch(a, n):
    return len(batch_bounds(n // a.world, a.batch_size))


# ----------------------------------------------------------------------------- optimisation


def base_lr(a):
    return a.lr * (a.batch_size * a.world / 256.0 if a.lr_scaling == "linear" else 1.0)


def lr_at(t, a, steps_per_epoch):
    """The closed-form lr of step t (0-based); see the module docstring."""
    base, S = base_lr(a), steps_per_epoch
    T, W = a.epochs * S, a.warmup_epochs * S
    if t < W:
        return base * (a.warmup_decay + (1.0 - a.warmup_decay) * t / W)
    u = t - W
    if a.lr_schedule == "step":
        return base * a.lr_gamma ** (u // (a.lr_step_size * S))
    if a.lr_schedule == "cosine":
        return a.lr_min + (base - a.lr_min) * (1.0 + math.cos(math.pi * u / max(1, T - W))) / 2.0
    return base


def param_groups(model, a):
    """Norm-layer parameters and every *.bias get norm_weight_decay; the rest weight_decay."""
    norm_ids = set()
    for m in model.modules():
        if isinstance(m, NORM_CLASSES):
            norm_ids.update(id(p) for p in m.parameters(recurse=False))
    norm, other = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (norm if id(p) in norm_ids or name.endswith(".bias") else other).append(p)
    groups = [{"params": other, "weight_decay": a.weight_decay}, {"params": norm, "weight_decay": a.norm_weight_decay}]
    return [g for g in groups if g["params"]], len(norm), len(other)


def make_optimizer(model, a):
    groups, n_norm, n_other = param_groups(model, a)
    lr = base_lr(a)
    if a.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=a.momentum, nesterov=a.nesterov)
    elif a.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    return opt, n_norm, n_other


def evaluate(model, images, transform, batch, k):
    """(mean cross-entropy, top-1, top-k) over the split, as fractions."""
    model.eval()
    loss_sum, hit1, hitk, n = 0.0, 0, 0, 0
    with torch.inference_mode():
        for lo in range(0, len(images), batch):
            x, y = images.batch(range(lo, min(lo + batch, len(images))), transform)
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            top = logits.topk(k, dim=1).indices
            hit1 += (top[:, 0] == y).sum().item()
            hitk += (top == y[:, None]).any(dim=1).sum().item()
            n += len(y)
    return loss_sum / max(n, 1), hit1 / max(n, 1), hitk / max(n, 1)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    # The same initial weights everywhere (DDP broadcasts rank 0's anyway), then each rank's own
    # stream for augmentation.
    torch.manual_seed(a.seed)
    random.seed(a.seed + a.rank)
    np.random.seed(a.seed + a.rank)
    if a.ddp:
        torch.distributed.init_process_group("gloo")
    try:
        return train_and_evaluate(a)
    finally:
        if a.ddp:
            torch.distributed.destroy_process_group()


def train_and_evaluate(a):

    if not os.path.isdir(a.data_dir):
        fail(f"{a.data_dir}: no such data dir")
    classes_csv = os.path.join(a.data_dir, "classes.csv")
    class_rows = read_csv(classes_csv, ["label"])
    K = len(class_rows)
    if K < 1:
        fail(f"{classes_csv}: no classes")
    if sorted(int(r["label"]) for r in class_rows) != list(range(K)):
        fail(f"{classes_csv}: labels are not 0..{K - 1}")
    train = Images(*read_split(a.data_dir, "train.csv", K), cache=not a.no_cache)
    test = Images(*read_split(a.data_dir, "test.csv", K), cache=not a.no_cache)
    if len(train) == 0:
        fail(f"{os.path.join(a.data_dir, 'train.csv')}: no images")

    S = steps_per_epoch(a, len(train))
    net = torchvision.models.resnet18(num_classes=K)  # the model itself: evaluated, averaged
    torch.manual_seed(a.seed + a.rank)  # augmentation's stream, after the initial weights
    model = nn.parallel.DistributedDataParallel(net) if a.ddp else net
    opt, n_norm, n_other = make_optimizer(net, a)
    base = base_lr(a)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_at(t, a, S) / base)

    if a.print_lr:
        T, W = a.epochs * S, a.warmup_epochs * S
        print(f"base lr {base:.6g} (--lr {a.lr:g}, scaling {a.lr_scaling}), S = {S} steps/epoch "
              f"({len(train)} images, batch {a.batch_size} x {a.world}), T = {T}, W = {W}, schedule {a.lr_schedule}")
        for t in range(min(a.print_lr, T)):
            lrs = {g["lr"] for g in opt.param_groups}
            assert len(lrs) == 1
            (lr,) = lrs
            print(f"step {t:5d} (epoch {t // S + 1}, step {t % S + 1}/{S}): lr {lr:.10g}  closed form {lr_at(t, a, S):.10g}")
            opt.step()  # no gradients: parameters stay; keeps LambdaLR's step-order check quiet
            sched.step()
        return 0

    train.check()
    test.check()
    train_tf, test_tf = transforms(a)
    mix = batch_mix(a, K)
    weights = sampling_weights(a, train.labels)
    # Soft targets (mixup / cutmix) go to the same criterion: CrossEntropyLoss takes class
    # probabilities and smooths them as well.
    criterion = nn.CrossEntropyLoss(label_smoothing=a.label_smoothing)
    k = min(5, K)
    W = a.warmup_epochs * S
    ema = None
    if a.ema_decay > 0:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(a.ema_decay), use_buffers=True)
        # The average starts as the initial weights, as sac's does: this first update copies them
        # (n_averaged 0 -> 1), so the first update after a step averages (unless in warmup).
        ema.update_parameters(net)
    run = {
        "train_images": len(train),
        "test_images": len(test),
        "classes": K,
        "steps_per_epoch": S,
        "world_size": a.world,
        "global_batch": a.batch_size * a.world,
        "base_lr": base,
        "norm_or_bias_params": n_norm,
        "other_params": n_other,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    result = {"recipe": vars(a), "run": run, "epochs": [], "final": None}
    say = print if a.rank == 0 else (lambda *args, **kw: None)
    say(f"resnet18, {K} classes, {len(train)} train / {len(test)} test images, {S} steps/epoch, "
        f"{a.optimizer} base lr {base:.4g}, {a.lr_schedule} schedule, {a.world} process(es) x "
        f"{a.threads} thread(s), batch {a.batch_size} per process", file=sys.stderr)
    say(f"train transform: {train_tf}\ntest transform: {test_tf}\nbatch mix: {mix}, sampler {a.sampler}, "
          f"EMA decay {a.ema_decay or 'off'}", file=sys.stderr)

    step = 0
    for epoch in range(a.epochs):
        t0 = time.perf_counter()
        model.train()
        order = epoch_order(a, len(train), epoch, weights)
        loss_sum, seen, lr = 0.0, 0, base
        for lo, hi in batch_bounds(len(order), a.batch_size):
            x, y = train.batch(order[lo:hi], train_tf)
            if mix is not None:
                x, y = mix(x, y)  # y: (N, K) soft targets
            lr = opt.param_groups[0]["lr"]
            opt.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            if not torch.isfinite(loss):
                print(f"recipe_torch.py: non-finite loss at epoch {epoch + 1}, step {step + 1}", file=sys.stderr)
                return 1
            loss.backward()
            if a.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), a.clip_grad_norm)
            opt.step()
            sched.step()
            if ema is not None:
                if step < W:
                    ema.n_averaged.fill_(0)  # warmup: the average copies the weights
                ema.update_parameters(net)
            step += 1
            loss_sum += loss.item() * len(y)
            seen += len(y)
        train_seconds = time.perf_counter() - t0
        if a.ddp:
            totals = torch.tensor([loss_sum, float(seen)], dtype=torch.double)
            torch.distributed.all_reduce(totals)
            loss_sum, seen = totals[0].item(), int(totals[1].item())
        if a.rank != 0:
            torch.distributed.barrier()  # rank 0 evaluates
            continue
        test_loss, top1, top5 = evaluate(net, test, test_tf, a.batch_size * a.world, k)
        ema_top1 = evaluate(ema, test, test_tf, a.batch_size * a.world, k)[1] if ema is not None else None
        seconds = time.perf_counter() - t0
        rec = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "test_loss": test_loss,
            "top1": top1,
            "top5": top5,
            "ema_top1": ema_top1,
            "lr_end": lr,
            "seconds": seconds,
            "images_per_second": seen / train_seconds,
        }
        result["epochs"].append(rec)
        print(f"epoch {epoch + 1}/{a.epochs}: train loss {rec['train_loss']:.4f}, test loss {test_loss:.4f}, "
              f"test top-1 {100 * top1:.2f}%, top-{k} {100 * top5:.2f}%, lr {lr:.4g}, "
              f"images/s {rec['images_per_second']:.1f}, seconds {seconds:.1f}"
              + (f", EMA top-1 {100 * ema_top1:.2f}%" if ema is not None else ""), file=sys.stderr, flush=True)
        if epoch + 1 == a.epochs:
            result["final"] = {"top1": top1, "top5": top5, "ema_top1": ema_top1}
        if a.out:
            write_json(a.out, result)
        if a.ddp:
            torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
