"""Checkpoint and resume: a run stopped by a signal mid-epoch and resumed ends where an unstopped run ends."""
import functools
import importlib
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from models_for_tests import TINY_MODEL_PY
from twistc import Pipeline, trace
from twistc import checkpoint
from twistc.checkpoint import CheckpointError
from twistc.errors import ModelFileError, Stopped
from twistc.machine import cpu_model
from twistc.resume import Checkpointing
from twistc.train import projections, train


IN = 5  # input channels: more than a stem's (RGB), so DeepTwist projects the first conv too


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(IN, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _deeptwist_model(spec="deeptwist{ratio=2,period=3}"):
    gm = trace(_model(), (torch.randn(1, IN, 8, 8),))
    return Pipeline.parse(spec).run(gm)


class Data:
    """Batches whose order and noise come from the global torch, numpy and Python RNGs, as user code's might;
    sends SIGTERM to this process while producing batch `stop_at` of the whole run, or dies without a
    signal (as a lost node does) at batch `crash_at`."""

    def __init__(self, stop_at=None, crash_at=None):
        self.stop_at, self.crash_at, self.made = stop_at, crash_at, 0
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(40, IN, 8, 8, generator=g), torch.randint(0, 4, (40,), generator=g)

    def __call__(self):
        order = torch.randperm(40)
        for i in range(0, 40, 8):
            self.made += 1
            if self.made == self.stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.made == self.crash_at:
                raise ConnectionError("node lost")
            idx = order[i:i + 8]
            noise = float(np.random.rand()) * random.random()
            yield self.x[idx] + 0.1 * noise * torch.randn_like(self.x[idx]), self.y[idx]

    def __len__(self):
        return 5


def _run(folder, stop_at=None, resume=False, epochs=3, optimizer="sgd", crash_at=None, every=0, spec=None,
         accumulate=1, amp="none", keep_best=False):
    gm = _deeptwist_model(*([spec] if spec else []))
    cp = Checkpointing(folder, checkpoint.identity("deeptwist,train", gm), resume, every) if folder else None
    data = Data(stop_at, crash_at)
    lr = 0.05 if optimizer == "sgd" else 0.005
    evaluation = dict(eval_data=lambda: [(data.x, data.y)], eval_every=1, keep_best=True) if keep_best else {}
    result = train(gm, lambda: data(), epochs, lr=lr, seed=3, progress=False, finalize=False, checkpointing=cp,
                   optimizer=optimizer, accumulate=accumulate, amp=amp, **evaluation)
    return gm, result


# mid-epoch, on an epoch's last batch, mid-epoch under AdamW, and under float16 with its gradient scaler
@pytest.mark.parametrize("stop_at, optimizer, amp", [(7, "sgd", "none"), (10, "sgd", "none"), (7, "adamw", "none"),
                                                     (7, "sgd", "fp16")])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, stop_at, optimizer, amp):
    torch.set_num_threads(1)
    # a scale so large that the first steps overflow and halve it: the resumed run must start from the saved one
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24))
    reference, ref_result = _run(None, optimizer=optimizer, amp=amp)
    with pytest.raises(Stopped) as stopped:
        _run(tmp_path, stop_at=stop_at, optimizer=optimizer, amp=amp)
    assert stopped.value.signum == signal.SIGTERM and "continue with resume=True" in stopped.value.message
    assert (tmp_path / checkpoint.FILE).is_file()
    if amp == "fp16":
        assert 1 < torch.load(tmp_path / checkpoint.FILE, weights_only=True)["scaler"]["scale"] < 2.0 ** 24
    resumed, result = _run(tmp_path, resume=True, optimizer=optimizer, amp=amp)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert [int(p.step) for p in projections(resumed)] == [15, 15]
    assert (result.steps, result.distortions) == (ref_result.steps, ref_result.distortions) == (15, 5)
    assert np.allclose(result.losses, ref_result.losses, atol=1e-6)
    assert result.distortion_changes == pytest.approx(ref_result.distortion_changes, abs=1e-6)
    # each process that trained is recorded: the steps it took, where, and for how long
    assert [s["steps"] for s in ref_result.sessions] == [[0, 15]]
    assert [s["steps"] for s in result.sessions] == [[0, stop_at], [stop_at, 15]]
    assert {(s["hardware"], s["device"]) for s in result.sessions} == {(cpu_model(), "cpu")}
    assert sum(s["seconds"] for s in result.sessions) == pytest.approx(result.seconds)


def test_a_stop_waits_for_the_accumulated_step_to_end_and_resumes_exactly(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    reference, ref_result = _run(None, accumulate=2)  # 5 batches an epoch: steps of 2, 2 and 1 batches
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda d, payload, *name: saved.append(dict(payload["position"]))
                        or real_save(d, payload, *name))
    with pytest.raises(Stopped):  # the signal comes with batch 8, the first of epoch 2's second step
        _run(tmp_path, stop_at=8, accumulate=2)
    assert {k: saved[-1][k] for k in ("epoch", "batch", "step")} == {"epoch": 1, "batch": 4, "step": 5}
    resumed, result = _run(tmp_path, resume=True, accumulate=2)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert [int(p.step) for p in projections(resumed)] == [9, 9]
    assert (result.steps, result.distortions) == (ref_result.steps, ref_result.distortions) == (9, 3)


def test_an_adaptive_period_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    spec = "deeptwist{ratio=2,period=2,target_change=0.05}"
    reference, ref_result = _run(None, spec=spec)
    with pytest.raises(Stopped):
        _run(tmp_path, stop_at=8, spec=spec)
    resumed, result = _run(tmp_path, resume=True, spec=spec)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert result.distortions == ref_result.distortions > 0
    assert [int(p.current_period) for p in projections(resumed)] == [int(p.current_period) for p in projections(reference)]


def test_periodic_checkpoints_survive_a_crash_without_a_signal(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    reference, _ = _run(None)
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda d, payload, *name: saved.append(payload["position"]["step"])
                        or real_save(d, payload, *name))
    with pytest.raises(ModelFileError, match=r"train_data\(\) raised ConnectionError"):  # batch 9 of 15 is never trained; the last save was after step 6
        _run(tmp_path, crash_at=9, every=3)
    assert saved == [3, 5, 6]  # every 3 steps, and at the end of epoch 1 (step 5)
    resumed, result = _run(tmp_path, resume=True, every=3)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    # (train_data() has no length here, so step 15 is saved both as a multiple of 3 and as an epoch end)
    assert sorted(set(saved)) == [3, 5, 6, 9, 10, 12, 15] and result.steps == 15


def test_the_best_weights_of_keep_best_survive_a_stop(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    real_evaluate = importlib.import_module("twistc.train").evaluate
    score_after_step = {5: 0.9, 10: 0.5, 15: 0.5}  # the best evaluation is epoch 1's, before the stop

    def scripted(module, eval_data, prepare):
        return {**real_evaluate(module, eval_data, prepare),
                "low_rank_accuracy": score_after_step[int(projections(module)[0].step)]}

    monkeypatch.setattr(importlib.import_module("twistc.train"), "evaluate", scripted)
    reference, ref_result = _run(None, keep_best=True)
    with pytest.raises(Stopped):
        _run(tmp_path, stop_at=12, keep_best=True)
    resumed, result = _run(tmp_path, resume=True, keep_best=True)
    assert result.kept_epoch == ref_result.kept_epoch == 1
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert [int(p.step) for p in projections(resumed)] == [5, 5]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    _run(tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match=r"pass resume=True to continue it, or choose another folder \(checkpoint=DIR\)"):
        _run(tmp_path)
    gm = trace(_model(), (torch.randn(1, IN, 8, 8),))  # no deeptwist: another structure
    cp = Checkpointing(tmp_path, checkpoint.identity("deeptwist,train", gm), resume=True)
    with pytest.raises(CheckpointError, match="another model structure"):
        train(gm, Data(), 1, progress=False, checkpointing=cp)
    gm = _deeptwist_model()
    for ident, what in ((checkpoint.identity("train{epochs=9}", gm), "another pipeline"),
                        (checkpoint.identity("deeptwist,train", gm, world_size=2), "another world size")):
        with pytest.raises(CheckpointError, match=what):
            train(gm, Data(), 1, progress=False, checkpointing=Checkpointing(tmp_path, ident, resume=True))


def test_identity_ignores_the_checkpoint_folder_and_how_often_it_saves_or_evaluates():
    gm = _deeptwist_model()
    assert checkpoint.identity("deeptwist,train{checkpoint=/a,epochs=2}", gm)["pipeline"] == "deeptwist,train{epochs=2}"
    assert (checkpoint.identity("deeptwist,train{epochs=2,checkpoint_every=7}", gm)["pipeline"]
            == checkpoint.identity("deeptwist,train{checkpoint_every=3,epochs=2}", gm)["pipeline"]
            == checkpoint.identity("deeptwist,train{epochs=2,eval_every=1}", gm)["pipeline"]
            == "deeptwist,train{epochs=2}")
    assert checkpoint.identity("train{checkpoint=/a}", gm)["pipeline"] == "train"


def test_identity_ignores_where_training_runs_but_not_where_a_plan_is_timed():
    gm = _deeptwist_model()
    on_gpu = checkpoint.identity("deeptwist,train{epochs=2,device=cuda,channels_last=true}", gm)["pipeline"]
    on_cpu = checkpoint.identity("deeptwist,train{device=cpu,epochs=2}", gm)["pipeline"]
    assert on_gpu == on_cpu == "deeptwist,train{epochs=2}"
    assert checkpoint.identity("train{device=cuda:1}", gm)["pipeline"] == "train"
    timed_on = {d: checkpoint.identity(f"plan-latency{{speedup=2,device={d}}},train", gm)["pipeline"]
                for d in ("cpu", "cuda")}
    assert timed_on["cpu"] != timed_on["cuda"]


def test_a_stop_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, {"identity": {}, "n": 1})
    real_save = torch.save

    def interrupted(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, {"identity": {}, "n": 2})
    assert checkpoint.load(tmp_path)["n"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILE]


TINY = TINY_MODEL_PY + '''
import os, signal

def train_data(stop: int = 0):
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        if stop and os.path.exists(os.environ["STOP_FILE"]):
            os.remove(os.environ["STOP_FILE"])
            os.kill(os.getpid(), signal.SIGINT)
        yield torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
'''


@pytest.mark.slow
def test_cli_stops_with_a_checkpoint_and_resumes(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(TINY)
    stop_file = tmp_path / "stop"
    stop_file.touch()
    common = [sys.executable, "-m", "twistc.cli", "compile", str(model), "--pass", "deeptwist-tucker", "--epochs", "2",
              "--period", "2", "--checkpoint", str(tmp_path / "ckpt"), "--quiet", "--set", "stop=1"]
    env = {**os.environ, "STOP_FILE": str(stop_file)}
    first = subprocess.run(common + ["-o", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert first.returncode == 130, first.stderr
    assert "stopped by SIGINT; checkpoint saved in" in first.stderr and not (tmp_path / "out").exists()
    again = subprocess.run(common + ["-o", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "pass --resume" in again.stderr and "(--checkpoint DIR)" in again.stderr
    resumed = subprocess.run(common + ["-o", str(tmp_path / "out"), "--resume"], capture_output=True, text=True,
                             env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and (tmp_path / "out" / "model.onnx").is_file()
    assert "trained in 2 sessions: steps 0-" in (tmp_path / "out" / "report.md").read_text()


def test_adamw_takes_adam_steps(monkeypatch):
    """train{optimizer=adamw} runs torch's AdamW with momentum as beta1, and its loss falls."""
    made = []
    real = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: made.append(k) or real(*a, **k))
    gm = _deeptwist_model()
    data = Data()
    result = train(gm, lambda: data(), 4, lr=0.01, momentum=0.8, weight_decay=0.01, progress=False,
                   optimizer="adamw")
    assert made == [{"lr": 0.01, "betas": (0.8, 0.999), "weight_decay": 0.01}]
    assert result.losses[-1] < result.losses[0]
