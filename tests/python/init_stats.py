"""Builds a freshly initialised torchvision model and writes per-tensor statistics of its
state_dict, so that sac's initialisation can be compared with torchvision's within sampling error.

usage: init_stats.py ARCH NUM_CLASSES OUT.json
ARCH is one of resnet18 resnet34 resnet50 alexnet vgg squeezenet densenet inception.

The models come from torchvision_models.py; inception is built as a user
gets it by default with aux_logits=False. In torchvision 0.28 `Inception3(init_weights=None)`
warns (FutureWarning) and then sets init_weights=True, so the default is the truncated-normal
initialisation; passing init_weights=True explicitly gives the same model without the warning.
(torchvision_logits.py passes init_weights=False only to skip that slow init before loading.)

The torch RNG is seeded with torch.manual_seed(0) before building. OUT.json maps every floating
point tensor of state_dict() (num_batches_tracked is skipped, being an integer counter) to
{"shape": [...], "numel": n, "mean": m, "std": s, "min": a, "max": b}, computed in float64;
"std" is the population standard deviation (divisor n, not n - 1), 0 for a constant tensor.
"""
import json
import sys

import torch

from torchvision_models import ARCHS, build



def stats(t: torch.Tensor) -> dict:
    x = t.detach().to(torch.float64).flatten()
    return {
        "shape": list(t.shape),
        "numel": x.numel(),
        "mean": x.mean().item(),
        "std": x.std(correction=0).item(),
        "min": x.min().item(),
        "max": x.max().item(),
    }


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in ARCHS:
        print(__doc__, file=sys.stderr)
        return 2
    arch, k, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build(arch, k, init_weights=True)
    result = {
        name: stats(t)
        for name, t in model.state_dict().items()
        if t.is_floating_point() and not name.endswith("num_batches_tracked")
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{arch}: {len(result)} tensors -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
