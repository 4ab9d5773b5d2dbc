"""Hand-off from DeepTwist to the factors (one schedule, carried optimizer state, exact resume) and
knowledge distillation from the original model."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from test_checkpoint import IN, Data, _model
from twistc import Pipeline, RunContext, trace
from twistc.errors import SpecError, Stopped
from twistc.cli import _parser
from twistc.commands import build_pipeline, handoff_epochs, preset_items
from twistc.defaults import DEFAULT_DISTILL
from twistc.train import Distillation, train

train_module = importlib.import_module("twistc.train")  # the module: twistc.train is also the function

HANDOFF = ("deeptwist{ratio=2,period=3},train{epochs=2,lr=0.05,seed=3},lower-conv-tucker,"
           "train{epochs=1,lr=0.05,seed=3,handoff=%s},cleanup")


def _pipeline_run(spec, data, folder=None, resume=False, teacher=None):
    gm = trace(_model(), (torch.randn(1, IN, 8, 8),))
    ctx = RunContext(train_data=lambda: list(data()), progress=False, checkpoint=str(folder) if folder else None,
                     resume=resume, teacher=teacher)
    return Pipeline.parse(spec).run(gm, ctx), ctx


@pytest.fixture
def lrs(monkeypatch):
    """The learning rate of every optimizer step, in order."""
    seen = []
    real = train_module._optimizer_step

    def record(optimizer, *args):
        seen.append(optimizer.param_groups[0]["lr"])
        return real(optimizer, *args)

    monkeypatch.setattr(train_module, "_optimizer_step", record)
    return seen


@pytest.mark.parametrize("handoff", ["continue", "rewind", "none"])
def test_a_handoff_continues_or_rewinds_one_schedule(lrs, handoff):
    _, ctx = _pipeline_run(HANDOFF % handoff, Data())
    assert len(lrs) == 15  # 5 batches an epoch, 3 epochs
    one_schedule = [0.05 * 0.5 * (1 + math.cos(math.pi * i / 15)) for i in range(15)]
    second = {"continue": one_schedule[10:], "rewind": [0.05 * 0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)],
              "none": [0.05 * 0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]}[handoff]
    first = one_schedule[:10] if handoff == "continue" else [0.05 * 0.5 * (1 + math.cos(math.pi * i / 10))
                                                             for i in range(10)]
    assert lrs == pytest.approx(first + second)
    result = ctx.results["train"]
    assert [p["handoff"] for p in result.phases] == ["none", handoff] and result.epochs == 3 and result.steps == 15


def test_surviving_parameters_keep_their_optimizer_state_across_the_handoff(monkeypatch):
    carried = {}
    real = train_module._carry_over

    def spy(module, optimizer, state):
        carried["count"] = real(module, optimizer, state)
        carried["names"] = {n for n, p in module.named_parameters() if p in optimizer.state}
        carried["given"] = state
        return carried["count"]

    monkeypatch.setattr(train_module, "_carry_over", spy)
    _pipeline_run(HANDOFF % "continue", Data())
    # the convs became factors; BatchNorm and the Linear layer survived with their momentum
    assert carried["names"] == {"1.weight", "1.bias", "6.weight", "6.bias"} and carried["count"] == 4
    assert {"0.weight", "3.weight"} <= set(carried["given"]["state"])  # the dense kernels' state is not carried


def test_a_handoff_needs_an_earlier_train_stage():
    with pytest.raises(SpecError, match="continues an earlier train stage"):
        _pipeline_run("lower-conv-tucker{ratio=2},train{epochs=1,handoff=continue}", Data())


def test_sigterm_in_the_second_stage_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    reference, ref_ctx = _pipeline_run(HANDOFF % "continue", Data())
    folder = tmp_path / "ckpt"
    with pytest.raises(Stopped):
        _pipeline_run(HANDOFF % "continue", Data(stop_at=13), folder)  # batch 3 of the factors' epoch
    assert (folder / "checkpoint.pt").is_file() and (folder / "checkpoint-train2.pt").is_file()
    resumed, ctx = _pipeline_run(HANDOFF % "continue", Data(), folder, resume=True)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=0, rtol=0, msg=name)
    assert ctx.results["train"].steps == ref_ctx.results["train"].steps == 15


def test_handoff_preset_splits_the_epochs_and_refuses_an_empty_phase():
    def preset_pipeline(*args, **kwargs):
        return ",".join(item.spec() for item in preset_items(*args, **kwargs))

    assert preset_pipeline("deeptwist-tucker", 10, handoff=0.7) == (
        "deeptwist{decomp=natural},train{epochs=7},lower,"
        "train{epochs=3,handoff=continue},fold,cleanup")
    assert "lower,train{epochs=1,handoff=continue},fold" in preset_pipeline("deeptwist-svd", 3, handoff=0.6)
    assert handoff_epochs(0.67, None) == (2, 1)
    for fraction, epochs in ((0.9, 3), (0.0, 3), (1.0, 10), (0.5, 1)):
        with pytest.raises(SpecError, match="each needs at least 1"):
            handoff_epochs(fraction, epochs)
    with pytest.raises(SpecError, match="--handoff applies to the presets"):
        preset_pipeline("tucker", 3, handoff=0.5)


def test_the_command_line_distils_unless_told_not_to():
    def trains(*flags, spec="tucker"):
        args = _parser().parse_args(["compile", "model.py", "--pass", spec, "--epochs", "2", *flags])
        return [s for s in build_pipeline(args.pipeline, args).stages if s.name == "train"]

    [default] = trains()
    assert default.distill == DEFAULT_DISTILL == 0.5
    assert [s.distill for s in trains("--distill", "0")] == [0.0]
    assert [s.distill for s in trains("--handoff", "0.5", spec="deeptwist-tucker")] == [0.5, 0.5]
    assert [s.distill for s in trains(spec="lower-conv-tucker,train{epochs=2,distill=0.2}")] == [0.2]  # as written


def test_distillation_at_weight_zero_is_no_distillation_and_the_teacher_never_changes():
    plain, _ = _pipeline_run("deeptwist{ratio=2,period=3},train{epochs=1,lr=0.05,seed=3}", Data())
    zero, _ = _pipeline_run("deeptwist{ratio=2,period=3},train{epochs=1,lr=0.05,seed=3,distill=0}", Data())
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(zero.state_dict()[name], value, atol=0, rtol=0, msg=name)
    teacher = _model().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distilled, ctx = _pipeline_run("deeptwist{ratio=2,period=3},train{epochs=1,lr=0.05,seed=3,distill=0.7}", Data(),
                                   teacher=teacher)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # buffers (BN) included
    assert any(not torch.equal(distilled.state_dict()[k], v) for k, v in plain.state_dict().items())
    result = ctx.results["train"]
    assert 0 < result.teacher_seconds < result.seconds
    _, kept = _pipeline_run("lower-conv-tucker{ratio=2},train{epochs=1,distill=0.5}", Data())
    _, idle = _pipeline_run("lower-conv-tucker{ratio=2},train{epochs=0,distill=0.5}", Data())
    assert kept.teacher is not None and idle.teacher is None  # no copy of the model for a stage that does not train


def test_pipeline_keeps_the_incoming_model_as_teacher():
    _, ctx = _pipeline_run("lower-conv-tucker{ratio=2},train{epochs=1,lr=0.05,distill=0.5}", Data())
    assert not any("tucker" in type(m).__name__.lower() for m in ctx.teacher.modules())  # the model before lowering


def test_the_distillation_loss_blends_labels_with_the_teachers_softened_outputs():
    scores = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    d = Distillation(torch.nn.Identity(), 0.25, 2.0)
    assert d.loss(F.cross_entropy, scores, y, scores) == pytest.approx(0.75 * F.cross_entropy(scores, y).item())
    other = torch.zeros(6, 4)
    kl = (F.softmax(other / 2, 1) * (F.log_softmax(other / 2, 1) - F.log_softmax(scores / 2, 1))).sum(1).mean()
    expected = 0.75 * F.cross_entropy(scores, y) + 0.25 * 4 * kl
    assert d.loss(F.cross_entropy, scores, y, other).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("spec, message", [("train{distill=1.5}", "distill is a weight in"),
                                           ("train{temperature=0}", "temperature must be"),
                                           ("train{handoff=later}", "handoff must be")])
def test_bad_distillation_and_handoff_options(spec, message):
    with pytest.raises(SpecError, match=message):
        Pipeline.parse(spec)


def test_training_targets_out_of_range_and_dict_outputs_are_named():
    model = trace(_model(), (torch.randn(1, IN, 8, 8),))
    bad = [(torch.randn(4, IN, 8, 8), torch.tensor([0, 1, 2, 9]))]
    with pytest.raises(Exception, match=r"train_data\(\) gives targets 0..9, but the model has 4 outputs"):
        train(model, lambda: bad, 1, progress=False)
