"""The torchvision model behind each of sac's architecture names (sac's `Arch`), for the test
scripts beside this file.

`init_weights` matters for inception only (the others always initialise): True builds it as a
user gets it by default with aux_logits=False (torchvision 0.28 warns, then initialises);
False skips that slow initialisation when the weights are loaded from a file anyway.
"""
import torch
import torchvision

ARCHS = ("resnet18", "resnet34", "alexnet", "vgg", "squeezenet", "densenet", "inception")


def build(arch: str, num_classes: int, init_weights: bool = True) -> torch.nn.Module:
    m = torchvision.models
    if arch == "resnet18":
        return m.resnet18(num_classes=num_classes)
    if arch == "resnet34":
        return m.resnet34(num_classes=num_classes)
    if arch == "alexnet":
        return m.alexnet(num_classes=num_classes)
    if arch == "vgg":
        return m.vgg11_bn(num_classes=num_classes)
    if arch == "squeezenet":
        return m.squeezenet1_0(num_classes=num_classes)
    if arch == "densenet":
        return m.densenet121(num_classes=num_classes)
    if arch == "inception":
        return m.inception_v3(num_classes=num_classes, aux_logits=False, init_weights=init_weights)
    raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
