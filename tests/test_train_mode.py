"""Train stages train the network the user trained: dropout and stochastic depth act in training and
vanish from the model exported for inference."""
import torch
import torch.nn.functional as F
from torch import nn

import twistc
from twistc import Pipeline, RunContext, trace


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: no parameters, a branch on self.training."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) >= self.p
        return x * keep / (1 - self.p)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.drop_path = DropPath(0.5)
        self.fc = nn.Linear(16, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = x.mean(1, keepdim=True) + self.drop_path(self.conv(x))
        h = F.dropout(self.fc(h.mean((2, 3))), 0.5, self.training)
        return self.head(h)


def test_dropout_and_drop_path_act_in_training_and_vanish_in_eval(tmp_path):
    model = Net().eval()
    x = torch.randn(6, 3, 8, 8)
    gm = trace(model, (x[:1],))
    assert isinstance(gm.get_submodule("drop_path"), DropPath)  # a leaf: it follows train() and eval()
    assert any(isinstance(m, nn.Dropout) for m in gm.modules())  # F.dropout(..., self.training) became a module
    torch.testing.assert_close(gm(x), model(x))  # eval: as the user's eval-mode model
    gm.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, gm(x))  # training: random drops, on both paths
    gm.eval()
    data = [(x, torch.randint(0, 4, (6,)))] * 2
    gm = Pipeline.parse("lower-linear-svd{ranks=4,layers=fc},train{epochs=1,lr=0.01}").run(
        gm, RunContext(train_data=lambda: data, progress=False))
    gm.eval()
    check = twistc.export_onnx(gm, (x[:1],), tmp_path / "model.onnx")  # the exported model: no dropout
    assert check.max_abs_diff < 1e-4
    torch.testing.assert_close(gm(x), gm(x))
