"""The train loop's options: precision and device, schedule, accumulation, evaluation."""
import copy
import importlib

import pytest
import torch
from torch import nn

from models_for_tests import tiny_deeptwist_cnn
from twistc import Pipeline, RunContext, trace
from twistc.errors import SpecError
from twistc.evaluation import accuracy
from twistc.train import _pace, final_projection, projections, train

train_module = importlib.import_module("twistc.train")  # twistc.train is also the function


def _deeptwist_model(spec="deeptwist{ratio=2,period=2}"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    return Pipeline.parse(spec).run(trace(net, (torch.randn(1, 3, 8, 8),)))


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_trains_on_cpu_and_keeps_float32_weights(amp):
    gm = _deeptwist_model()
    data = _data()
    result = train(gm, lambda: data, 2, lr=0.05, progress=False, amp=amp)
    assert result.steps == 8 and result.distortions == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 for p in gm.parameters())


def test_fp16_skips_a_step_whose_scaled_gradients_overflow():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,))
    model = trace(net, (x[:1],))
    before = [p.detach().clone() for p in model.parameters()]
    train(model, lambda: [(x * 1e3, y)], 1, lr=0.1, progress=False, amp="fp16")  # scaled grads overflow float16
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # skipped, not NaN weights
    train(model, lambda: [(x, y)], 1, lr=0.1, progress=False, amp="fp16")
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_projection_runs_in_full_precision_under_autocast():
    gm = _deeptwist_model()
    projection = projections(gm)[0]
    weight = gm.get_parameter(projection.weight_name)
    plain = weight.detach().clone()
    projection.project_(plain)
    under = weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        projection.project_(under)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, plain, atol=0, rtol=0)


@pytest.mark.parametrize("spec, message", [("train{amp=fp8}", "amp must be none, bf16 or fp16"),
                                           ("train{device=tpu}", "device must be cpu, cuda or cuda:N")])
def test_bad_precision_or_device(spec, message):
    with pytest.raises(SpecError, match=message):
        Pipeline.parse(spec)


def test_channels_last_trains_like_contiguous_and_hands_back_contiguous_weights():
    data = _data()
    plain, fast = _deeptwist_model(), _deeptwist_model()
    train(plain, lambda: data, 1, lr=0.05, progress=False)
    train(fast, lambda: data, 1, lr=0.05, progress=False, channels_last=True)
    for (name, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)
    assert all(p.is_contiguous() for p in fast.parameters())


def test_bn_rectification_after_distortions_changes_only_the_statistics():
    base = _data()

    def augmented():  # draws from the global RNG, as data augmentation does
        return ((x * (1 + 0.1 * torch.rand(())), y) for x, y in base)

    plain, rectified = _deeptwist_model(), _deeptwist_model()
    train(plain, augmented, 2, lr=0.05, progress=False)
    result = train(rectified, augmented, 2, lr=0.05, progress=False, rectify_bn=2)
    assert result.distortions == 4
    stats = ("running_mean", "running_var", "num_batches_tracked")
    for (name, a), b in zip(plain.state_dict().items(), rectified.state_dict().values()):
        if name.endswith(stats):
            assert name.endswith("num_batches_tracked") or not torch.equal(a, b), name
        else:  # training-mode BatchNorm uses batch statistics, and the random streams were left alone
            assert torch.equal(a, b), name
    with pytest.raises(SpecError, match="rectify_bn must be"):
        Pipeline.parse("train{rectify_bn=-1}")


def _recorded_lrs(monkeypatch, **options):
    """The learning rate of each optimizer step of a 2-epoch run (8 steps)."""
    seen = []
    step = torch.optim.SGD.step
    data = _data()
    with monkeypatch.context() as m:
        m.setattr(torch.optim.SGD, "step", lambda self, *a, **k: seen.append(self.param_groups[0]["lr"])
                  or step(self, *a, **k))
        train(_deeptwist_model(), lambda: data, 2, lr=0.1, progress=False, **options)
    return seen


def test_warmup_ramps_the_learning_rate_under_the_cosine(monkeypatch):
    cosine = _recorded_lrs(monkeypatch)
    warm = _recorded_lrs(monkeypatch, warmup=4)
    assert cosine[0] == pytest.approx(0.1) and cosine[4] == pytest.approx(0.05)
    assert warm == pytest.approx([c * min(1, (i + 1) / 4) for i, c in enumerate(cosine)])
    with pytest.raises(SpecError, match="warmup must be"):
        Pipeline.parse("train{warmup=-1}")


def test_linear_and_constant_schedules(monkeypatch):
    assert _recorded_lrs(monkeypatch, schedule="linear") == pytest.approx([0.1 * (1 - i / 8) for i in range(8)])
    assert _recorded_lrs(monkeypatch, schedule="constant", warmup=2) == pytest.approx([0.05] + [0.1] * 7)
    with pytest.raises(SpecError, match="schedule must be cosine, linear, constant"):
        Pipeline.parse("train{schedule=step}")


def test_clip_grad_bounds_the_step():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    x, y = 100 * torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,))  # large inputs, large gradients
    moved = {}
    for clip in (0.0, 0.5):
        model = trace(net, (x[:1],))
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        train(model, lambda: [(x, y)], 1, lr=0.1, momentum=0, weight_decay=0, progress=False, clip_grad=clip)
        moved[clip] = float((torch.cat([p.detach().flatten() for p in model.parameters()]) - before).norm())
    assert moved[0.0] > 0.1 * 0.5 * 10  # unclipped, the gradient norm is far above 0.5
    assert moved[0.5] == pytest.approx(0.1 * 0.5, rel=1e-4)  # one step of lr * clip, the cosine's first lr
    with pytest.raises(SpecError, match="clip_grad must be"):
        Pipeline.parse("train{clip_grad=-1}")


class Unsized:
    """train_data() as a generator: no length, so the epoch's last step is found when it runs out."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches


@pytest.mark.parametrize("sized", [True, False])
def test_accumulated_steps_equal_steps_over_the_concatenated_batches(sized):
    torch.set_num_threads(1)
    small = [(x[:4], y[:4]) for x, y in _data()] + [(x[4:], y[4:]) for x, y in _data()[:1]]  # 5 batches of 4
    groups = [small[0:2], small[2:4], small[4:5]]  # the last optimizer step has one batch
    large = [(torch.cat([x for x, _ in g]), torch.cat([y for _, y in g])) for g in groups]
    accumulated, plain = tiny_deeptwist_cnn(), tiny_deeptwist_cnn()
    result = train(accumulated, lambda: small if sized else Unsized(small), 2, lr=0.05, progress=False,
                   accumulate=2)
    reference = train(plain, lambda: large if sized else Unsized(large), 2, lr=0.05, progress=False)
    for (name, a), b in zip(plain.state_dict().items(), accumulated.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)
    assert result.steps == reference.steps == 6 and result.distortions == reference.distortions == 3
    assert [int(p.step) for p in projections(accumulated)] == [6]  # the second conv's: the stem stays dense
    with pytest.raises(SpecError, match="accumulate must be >= 1"):
        Pipeline.parse("train{accumulate=0}")


def test_evaluations_during_training_leave_it_as_it_was():
    torch.set_num_threads(1)
    data = _data()
    spec = "deeptwist{ranks=2x1,period=5}"  # the 2nd epoch's last projection is 3 steps before its end
    plain, watched = _deeptwist_model(spec), _deeptwist_model(spec)
    train(plain, lambda: data, 2, lr=0.05, progress=False, finalize=False)
    result = train(watched, lambda: data, 2, lr=0.05, progress=False, finalize=False, eval_data=lambda: data,
                   eval_every=1)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
    assert [e["epoch"] for e in result.evaluations] == [1, 2]
    assert result.evaluations[-1]["loss"] == result.losses[-1]
    assert result.evaluations[-1]["accuracy"] == accuracy(watched, data)
    projected = copy.deepcopy(watched)
    final_projection(projected)  # what the final projection would deploy now
    assert result.evaluations[-1]["low_rank_accuracy"] == accuracy(projected, data) != accuracy(watched, data)
    sparse = train(_deeptwist_model(spec), lambda: data, 3, lr=0.05, progress=False, eval_data=lambda: data,
                   eval_every=2)
    assert [e["epoch"] for e in sparse.evaluations] == [2, 3]  # every 2nd epoch, and the last


def test_keep_best_ends_with_the_weights_of_the_best_evaluation(monkeypatch):
    torch.set_num_threads(1)
    data = _data()
    real_evaluate, snapshots, scores = train_module.evaluate, [], iter([0.5, 0.9, 0.9, 0.7])

    def scripted(module, eval_data, prepare):  # the real evaluation, with scripted low-rank scores
        snapshots.append(copy.deepcopy(module.state_dict()))
        return {**real_evaluate(module, eval_data, prepare), "low_rank_accuracy": next(scores)}

    monkeypatch.setattr(train_module, "evaluate", scripted)
    gm = _deeptwist_model()
    result = train(gm, lambda: data, 4, lr=0.05, progress=False, finalize=False, eval_data=lambda: data,
                   eval_every=1, keep_best=True)
    assert result.kept_epoch == 2  # the first of the two best
    for (name, a), b in zip(snapshots[1].items(), gm.state_dict().values()):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=name)
    assert not torch.equal(snapshots[3]["0.weight"], gm.state_dict()["0.weight"])


def test_keep_best_deploys_what_the_best_low_rank_evaluation_measured():
    torch.set_num_threads(1)
    data = _data()
    gm = _deeptwist_model("deeptwist{ratio=2,period=3}")
    ctx = RunContext(train_data=lambda: data, eval_data=lambda: data, progress=False)
    # a learning rate high enough that the low-rank accuracy goes up and down (here it peaks at epoch 4 of 6)
    Pipeline.parse("train{epochs=6,lr=0.25,schedule=constant,eval_every=1,keep_best=true}").run(gm, ctx)
    result = ctx.results["train"]
    best = max(result.evaluations, key=lambda e: e["low_rank_accuracy"])  # the first of equals
    assert result.kept_epoch == best["epoch"] < 6 and result.final_projections == 1  # the stem stays dense
    assert accuracy(gm, data) == best["low_rank_accuracy"]


def test_keep_best_needs_evaluations():
    with pytest.raises(SpecError, match="keep_best chooses among the evaluations of eval_every"):
        Pipeline.parse("train{keep_best=true}")
    with pytest.raises(SpecError, match="keep_best needs evaluations during training"):
        train(_deeptwist_model(), _data, 1, progress=False, eval_every=1, keep_best=True)


def test_epoch_pace_extrapolates_from_the_part_of_the_epoch_this_process_ran():
    assert _pace(30.0, 3000, 1.0, 2) == "30 s, 100 samples/s, 60 s left"
    assert _pace(30.0, 3000, 0.5, 2) == "30 s, 100 samples/s, 2.0 min left"  # resumed halfway through
    assert _pace(3000.0, 1_500_000, 1.0, 4) == "50.0 min, 500 samples/s, 3.3 h left"
    assert _pace(0.4, 100, 1.0, 0) == "0.4 s, 250 samples/s"  # the last epoch


@pytest.mark.parametrize("batches", [0, 3])
def test_recalibrate_bn_reestimates_batchnorm_after_the_final_projection(batches):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    gm = Pipeline.parse("deeptwist{ratio=2,period=2}").run(trace(net, (torch.randn(1, 3, 6, 6),)))
    data = [(torch.randn(4, 3, 6, 6), torch.randint(0, 8, (4,))) for _ in range(3)]
    result = train(gm, lambda: data, epochs=1, progress=False, recalibrate_bn=batches)
    assert result.final_projections == 1  # the second conv's: the stem stays dense
    bn = next(m for m in gm.modules() if isinstance(m, nn.BatchNorm2d))
    trained = bn.running_mean.clone()
    train_module.recalibrate_batchnorm(gm, lambda: data, 3)  # the statistics of the final weights
    assert torch.allclose(bn.running_mean, trained, atol=1e-6) == (batches > 0)


@pytest.mark.parametrize("spec", ["deeptwist{ratio=2,period=7}", "deeptwist{ratio=2,period=7,late_period=3,late_after=15}",
                                  "deeptwist{ratio=2,period=5,target_change=0.05}"])
def test_next_distortion_is_the_first_step_that_projects(spec):
    for p in projections(_deeptwist_model(spec)):
        for step in range(int(p.next_at) if p.target_change else 40):  # adaptive: known up to the next one
            assert p.next_distortion(step) == next(s for s in range(step + 1, 100) if p.distorts_at(s))


@pytest.mark.parametrize("sized", [True, False])
def test_a_training_too_short_to_project_warns_with_a_period_that_fits(caplog, sized):
    data = _data()  # 4 batches: 8 steps in 2 epochs
    batches = (lambda: data) if sized else (lambda: Unsized(data))
    with caplog.at_level("WARNING", logger="twistc.train"):
        result = train(_deeptwist_model("deeptwist{ratio=2,period=9}"), batches, 2, lr=0.01, progress=False)
    assert result.distortions == 0
    told = [r.getMessage() for r in caplog.records if "DeepTwist" in r.getMessage()]
    assert len(told) == 1 and "(S_D = 9)" in told[0] and "period to 2 or less" in told[0]
    assert ("trains 8 steps and its first projection comes after 9" if sized else "made no projection in 8") in told[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="twistc.train"):
        result = train(_deeptwist_model("deeptwist{ratio=2,period=8}"), batches, 2, lr=0.01, progress=False)
    assert result.distortions == 1 and not [r for r in caplog.records if "DeepTwist" in r.getMessage()]
