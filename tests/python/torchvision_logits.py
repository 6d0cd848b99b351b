"""Loads a sac checkpoint into the torchvision model of the same architecture with strict
checking, runs it in eval mode on the input tensor stored beside it, and compares the logits
with the ones sac computed.

usage: torchvision_logits.py ARCH NUM_CLASSES MODEL.safetensors CASE.safetensors [TOLERANCE]
CASE.safetensors holds `input` (N x 3 x H x W) and `logits` (N x K) from sac.
Exit 0 when strict loading works and max |sac - torchvision| <= TOLERANCE (default 1e-4)
times max(1, largest |logit|).
"""
import sys

import torch
from safetensors.torch import load_file

from torchvision_models import build



def main() -> int:
    arch, k, model_file, case_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tol = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-4
    torch.set_num_threads(1)
    model = build(arch, k, init_weights=False)
    model.load_state_dict(load_file(model_file), strict=True)
    model.eval()
    case = load_file(case_file)
    with torch.no_grad():
        logits = model(case["input"])
    diff = (logits - case["logits"]).abs().max().item()
    scale = max(1.0, logits.abs().max().item())
    print(f"{arch}: strict load ok, max |sac - torchvision| = {diff:.3g} (largest |logit| {scale:.3g})")
    # Absolute for logits of ordinary size; relative to the largest logit beyond 1.
    return 0 if diff <= tol * scale else 1


if __name__ == "__main__":
    sys.exit(main())
