"""MODEL.py for twistc: any timm architecture by name.

    twistc compile examples/timm_model.py --set name=efficientnet_b0 --pass tucker --ratio 2 -o out/
    twistc compile examples/timm_model.py --set name=vit_tiny_patch16_224 --target-speedup 1.5 -o out/

`--set checkpoint=PATH` loads your weights (a state dict saved by torch.save, or a dict holding one under
"state_dict" or "model"); without one the weights are timm's random initialisation, which is enough to
measure size and speed but not accuracy. `--set pretrained=true` asks timm for its published weights (from
the Hugging Face hub or its cache). Needs timm, which works here without torchvision:

    pip install 'twistc[timm]' && pip install --no-deps 'timm>=1.0'
"""
import torch

from twistc.models.timm_models import create_model, input_size


def model(name: str = "resnet18", checkpoint: str = "", pretrained: bool = False, num_classes: int = 0) -> torch.nn.Module:
    torch.manual_seed(0)  # random weights, where no others are given, are the same in every compile
    net = create_model(name, num_classes=num_classes or None, pretrained=pretrained)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            state = state.get(key, state) if isinstance(state, dict) else state
        net.load_state_dict(state)
    return net.eval()


def example_inputs(name: str = "resnet18", batch: int = 1):
    """One batch at the architecture's default input size (timm's pretrained config)."""
    return (torch.randn(batch, *input_size(name)),)
