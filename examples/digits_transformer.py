"""MODEL.py for twistc: a small vision transformer on scikit-learn's bundled 8x8 handwritten digits.

Patches of 2x2 pixels (a strided conv), a learned position embedding, two encoder blocks whose
attention is written with nn.Linear layers (q, k, v and output projections, so each can be
compressed; nn.MultiheadAttention runs as one fused call that no pass can reach), a GELU MLP, and a
linear head on the mean token. model() trains it from scratch with AdamW (seeded, seconds on a CPU).
The data and the held-out 20% are those of examples/digits.py.

    twistc compile examples/digits_transformer.py --pass deeptwist-svd --ratio 2 --epochs 6 --period 25
"""
import math

import torch
from torch import nn

from digits import _split, eval_data, pretrain, train_data  # noqa: F401  (the CNN example's data)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    def __init__(self, dim: int = 48, heads: int = 4, depth: int = 2):
        super().__init__()
        self.patches = nn.Conv2d(1, dim, 2, stride=2)  # 8x8 -> 16 tokens
        self.position = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


def model(pretrain_epochs: int = 20, seed: int = 0) -> nn.Module:
    """The transformer trained from scratch on the training split (AdamW, one-cycle lr, seeded)."""
    torch.manual_seed(seed)
    net = DigitsTransformer()
    return pretrain(net, torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.05), pretrain_epochs,
                    batch_size=64)


def example_inputs():
    return (_split()[2][:1],)
