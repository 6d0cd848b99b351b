"""The torchvision model behind each of sac's architecture names (sac's `Arch`), for the test
scripts beside this file.

`init_weights` matters for inception only (the others always initialise): True builds it as a
user gets it by default with aux_logits=False (torchvision 0.28 warns, then initialises);
False skips that slow initialisation when the weights are loaded from a file anyway.
"""
import torch
import torchvision

# sac's name -> torchvision's constructor.
CONSTRUCTORS = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "alexnet": "alexnet",
    "vgg": "vgg11_bn",
    "squeezenet": "squeezenet1_0",
    "densenet": "densenet121",
    "inception": "inception_v3",
}
ARCHS = tuple(CONSTRUCTORS)


def build(arch: str, num_classes: int, init_weights: bool = True) -> torch.nn.Module:
    if arch not in CONSTRUCTORS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    constructor = getattr(torchvision.models, CONSTRUCTORS[arch])
    if arch == "inception":
        return constructor(num_classes=num_classes, aux_logits=False, init_weights=init_weights)
    return constructor(num_classes=num_classes)
