"""Defaults that the command line shows before torch is imported."""

DEFAULT_RATIO = 2.0  # per-layer weight compression ratio when none is asked for
# weight of distillation from the original model in the CLI's train stages: on CIFAR-10 ResNet-32 at 6.7x it
# added 1.74 points after 3 epochs and 1.09 after 30 (results/accuracy_recipes); on the digits transformer it tied
DEFAULT_DISTILL = 0.5
