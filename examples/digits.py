"""MODEL.py for twistc: a small CNN on scikit-learn's bundled 8x8 handwritten digits.

The data ships inside scikit-learn (1,797 images, 10 classes); a fixed, stratified 20% is held out
for evaluation. model() trains the CNN from scratch (seeded, a few seconds on a laptop CPU), so
the example needs no download and no checkpoint.

    twistc compile examples/digits.py --pass deeptwist-tucker --ratio 3 --epochs 6 --period 25
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn


@functools.lru_cache(maxsize=None)
def _split(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=digits.target,
                                           random_state=seed)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.conv1, self.bn1 = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
        self.conv3, self.bn3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w)
        self.conv4, self.bn4 = nn.Conv2d(4 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean(dim=(2, 3)))


def train_data(batch_size: int = 32):
    """One epoch of shuffled training batches. The order comes from torch's global RNG, which the train
    stage seeds (train{seed=N}) and its checkpoints restore, so a run and its resumption see the same data."""
    x, y, _, _ = _split()
    order = torch.randperm(len(y))
    return [(x[i], y[i]) for i in order.split(batch_size)]


def eval_data(batch_size: int = 256):
    _, _, x, y = _split()
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def model(pretrain_epochs: int = 15, seed: int = 0) -> nn.Module:
    """The CNN trained from scratch on the training split (Adam, seeded)."""
    torch.manual_seed(seed)
    net = DigitsCNN()
    return pretrain(net, torch.optim.Adam(net.parameters(), lr=3e-3), pretrain_epochs)


def pretrain(net: nn.Module, optimizer, epochs: int, batch_size: int = 32) -> nn.Module:
    """Train `net` from scratch on the training split with a one-cycle schedule to the optimizer's lr."""
    steps = epochs * -(-len(_split()[1]) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, optimizer.param_groups[0]["lr"], total_steps=steps)
    net.train()
    for _ in range(epochs):
        for x, y in train_data(batch_size=batch_size):
            optimizer.zero_grad()
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            if schedule.last_epoch + 1 < schedule.total_steps:
                schedule.step()
    return net.eval()


def example_inputs():
    return (_split()[2][:1],)
