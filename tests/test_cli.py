import gc
import json
import re
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from models_for_tests import TINY_MODEL_PY
from twistc import commands
from twistc.cli import entry, main

REPO = Path(__file__).resolve().parents[1]

TINY = TINY_MODEL_PY
TRAIN = '''
def train_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
'''


EVAL = '''
def eval_data():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g))]
'''
WRAP = '''
class Wrap(nn.Module):
    def __init__(self, *layers_and_key):
        super().__init__()
        self.body, self.key = nn.Sequential(*layers_and_key[:-1]), layers_and_key[-1]

    def forward(self, x):
        return {self.key: self.body(x)}

'''


def _model_file(tmp_path, body=TINY + TRAIN, name="model.py"):
    path = tmp_path / name
    path.write_text(body)
    return path


def _fails(capsys, argv, message):
    code = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2, lines
    assert lines[-1].startswith("twistc: error: ") and all(line.startswith("twistc: ") for line in lines), lines
    assert message in lines[-1], lines
    return lines[-1]


@pytest.mark.slow
def test_adaptive_period_evaluations_and_the_kept_epoch_are_reported(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(REPO / "examples" / "digits.py"), "--pass",
                 "deeptwist{ratio=3,period=10,target_change=0.01},train{epochs=1,eval_every=1,keep_best=true},"
                 "lower-conv-tucker,"
                 "cleanup", "--set", "pretrain_epochs=4", "-o", str(out), "--quiet"]) == 0
    training = json.loads((out / "report.json").read_text())["training"]
    periods = training["adaptive_periods"]
    assert len(periods) == 3 and all(p >= 1 for p in periods)  # conv1 holds 0.12% of the weights: dense
    text = capsys.readouterr().out
    assert f"adaptive S_D at the end of training: {min(periods)} to {max(periods)} steps" in text
    [evaluation] = training["evaluations"]
    assert evaluation["epoch"] == 1 and evaluation["accuracy"] == training["accuracy_before_final_projection"]
    assert f"accuracy during training: {evaluation['accuracy']:.2%} after epoch 1, " \
           f"{evaluation['low_rank_accuracy']:.2%} low-rank" in text
    assert training["kept_epoch"] == 1 and "kept the weights of epoch 1, the best evaluation" in text
    assert f"| 1 (kept) | {evaluation['loss']:.4f} | {evaluation['accuracy']:.2%} |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_option_fills_the_train_stage_of_a_preset(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compile", str(REPO / "examples" / "digits.py"), "--pass", "deeptwist-tucker", "--ratio", "3",
                 "--epochs", "1", "--option", "accumulate=2", "--option", "eval_every=1", "--set", "pretrain_epochs=4",
                 "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    [evaluation] = report["training"]["evaluations"]  # without --quiet, a line per epoch
    line = re.escape(f"twistc: epoch 1/1: loss {evaluation['loss']:.4f}, ") + r"[\d.]+ s, [\d,]+ samples/s" + \
        re.escape(f"; eval accuracy {evaluation['accuracy']:.2%}")
    assert re.search(line, capsys.readouterr().err)
    assert "train{epochs=1,distill=0.5,accumulate=2,eval_every=1}" in report["pipeline"]
    assert report["training"]["steps"] == 23  # 45 batches, 2 to a step


@pytest.mark.slow
def test_compile_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compile", str(REPO / "examples" / "digits.py"), "--pass", "deeptwist-tucker", "--ratio", "3",
                 "--epochs", "1", "--period", "10", "--set", "pretrain_epochs=4", "-o", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([".twistc-output.json", "original.onnx", "model.onnx",
                                                            "model.pt2", "report.json", "report.md"])
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"] == ("deeptwist{decomp=natural,period=10,ratio=3},train{epochs=1,distill=0.5},lower,fold,"
                                  "cleanup")
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "conv2", "conv3", "conv4", "fc"]
    assert report["layers"][-1]["skip_reason"].startswith("the model's head: it keeps a rank per output (10)")
    assert "save too little to matter" in report["layers"][0]["skip_reason"]  # conv1: 288 of 242k weights
    for layer in report["layers"][1:-1]:
        assert layer["lowering"] == "tucker-chain" and layer["ratio_achieved"] >= 3
        assert set(layer) >= {"name", "skip_reason", "ranks", "params_before", "params_after", "flops_before",
                              "flops_after"}
        assert report["plan"][layer["name"]]["ranks"] == layer["ranks"]
    assert report["compressed_layers"]["ratio"] >= 3
    assert report["training"]["steps"] == 45 and report["training"]["distortions"] == 4
    assert report["training"]["final_projections"] == 3
    assert 0 < report["training"]["accuracy_before_final_projection"] <= 1
    assert report["accuracy"]["before"] > 0.9 and 0 < report["accuracy"]["after"] <= 1
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["onnx"]["atol"] == 1e-4
    assert set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}
    phases = report["phase_seconds"]  # where the compile's time went; the training is in the passes
    assert set(phases) == {"evaluation", "trace", "original.onnx", "passes", "model.onnx", "model.pt2", "latency"}
    assert report["training"]["seconds"] <= phases["passes"] and sum(phases.values()) <= report["seconds"]
    assert "conv4" in text and "tucker-chain" in text and "ONNX check" in text
    # without plan-latency, the two models are timed in onnxruntime on the CPU at batch 1, 1 thread
    latency = report["latency"]
    assert {k: latency["runtime"][k] for k in ("runtime", "device", "threads", "batch")} == \
        {"runtime": "ort", "device": "cpu", "threads": 1, "batch": 1}
    assert "predicted_speedup" not in latency and len(latency["measured"]["samples_ms"]) == 2
    assert f"1 thread, batch 1: measured medians {latency['measured']['before_ms']:.3f} -> " in text
    assert all(0 <= layer["final_projection_change"] < 1 for layer in report["layers"][1:-1])
    assert "the final projection removed" in (out / "report.md").read_text()
    changes = report["training"]["distortion_changes"]
    assert len(changes) == 4 and changes[-1] < changes[0] < 1
    program = torch.export.load(out / "model.pt2")
    x = torch.randn(3, 1, 8, 8)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(program.module()(x), torch.from_numpy(onnx_out), atol=1e-4, rtol=1e-4)
    # the report's plan feeds back in
    again = tmp_path / "again"
    assert main(["compile", str(REPO / "examples" / "digits.py"), "--pass", "tucker", "--plan",
                 str(out / "report.json"), "--set", "pretrain_epochs=1", "-o", str(again), "--quiet"]) == 0
    replayed = json.loads((again / "report.json").read_text())
    assert [l["ranks"] for l in replayed["layers"]] == [l["ranks"] for l in report["layers"]]


def test_a_slower_compiled_model_gets_a_warning_and_a_skipped_or_failed_timing_loses_nothing(tmp_path, capsys,
                                                                                         monkeypatch):
    measured = {"median_ms": [1.0, 1.25], "speedup": 0.8, "speedup_ci95": [0.78, 0.82], "reps": 30,
                "samples_ms": [[1.0], [1.25]], "trustworthy": True, "problems": [], "sampling": {}}
    monkeypatch.setattr(commands, "compare_models", lambda timers, reps, threads: measured)
    model = _model_file(tmp_path)
    assert main(["compile", str(model), "--pass", "tucker", "--ratio", "2", "--epochs", "0", "-o",
                 str(tmp_path / "a"), "--quiet"]) == 0
    assert "measured slower than the original (0.80x in ort cpu, 1 thread(s), batch 1)" in capsys.readouterr().err
    assert json.loads((tmp_path / "a" / "report.json").read_text())["latency"]["measured"]["speedup"] == 0.8
    assert main(["compile", str(model), "--pass", "tucker", "--ratio", "2", "--epochs", "0", "--no-timing", "-o",
                 str(tmp_path / "b"), "--quiet"]) == 0
    assert "latency" not in json.loads((tmp_path / "b" / "report.json").read_text())

    def broken(timers, reps, threads):
        raise RuntimeError("no such provider\nmore")

    monkeypatch.setattr(commands, "compare_models", broken)  # a failed timing loses nothing the compile made
    assert main(["compile", str(model), "--pass", "tucker", "--ratio", "2", "--epochs", "0", "-o",
                 str(tmp_path / "c"), "--quiet"]) == 0
    assert "timing the models in ort cpu, 1 thread(s), batch 1 failed (RuntimeError: no such provider)" \
        in capsys.readouterr().err
    assert "latency" not in json.loads((tmp_path / "c" / "report.json").read_text())


def test_passes_lists_passes_and_presets(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    for name in ("deeptwist", "lower-conv-tucker", "cleanup", "train", "tucker", "deeptwist-tucker"):
        assert name in text
    assert "= deeptwist{decomp=natural},train,lower,fold,cleanup" in text


def test_the_command_freezes_the_heap_before_the_process_ends(capsys):
    """`twistc` (entry) leaves the interpreter's exit no garbage collection to do over what it imported;
    main, which tests and library callers use, freezes nothing."""
    gc.unfreeze()
    assert main(["passes"]) == 0 and gc.get_freeze_count() == 0
    try:
        assert entry(["passes"]) == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()  # the test process goes on collecting


@pytest.mark.parametrize("body,message", [
    ("def model(:\n", "syntax error in model.py line 1"),
    ("import torch\ndef example_inputs():\n    return torch.zeros(1)\n", "must define model()"),
    (TINY.replace("torch.manual_seed(0)", "raise ValueError('no weights here')"), "model() in model.py raised ValueError: no weights here"),
    ("import no_such_package_xyz\n", "importing model.py raised ModuleNotFoundError"),
    ("import sys\nsys.exit(0)\n", "importing model.py called sys.exit(0)"),
    (TINY.replace("torch.manual_seed(0)", "import sys; sys.exit(3)"), "model() in model.py called sys.exit(3)"),
    (TINY.replace("(torch.randn(1, 3, 8, 8),)", "(torch.randn(0, 3, 8, 8),)"), "a batch of 0"),
    (TINY.replace("(torch.randn(1, 3, 8, 8),)", "(torch.randn(1, 3, 8, 8).numpy(),)"), "gives a ndarray as input 0"),
    (TINY.replace("(torch.randn(1, 3, 8, 8),)", "(torch.randn(1, 5, 8, 8),)"), "running Sequential on example_inputs()"),
    (TINY + EVAL.replace("torch.randint(0, 4", "torch.randint(7, 9"), "targets must be class indices in [0, 4)"),
    (TINY + EVAL.replace("torch.randn(4, 3,", "torch.randn(4, 5,"), "running the model on a batch of eval_data()"),
    (TINY.replace("return nn.Sequential(", "return Wrap(").replace("def model():", WRAP + "def model():")
     .replace("nn.Linear(8, 4))", "nn.Linear(8, 4), 'scores')") + EVAL, "it returns a dict"),
])
def test_broken_model_files(tmp_path, capsys, body, message):
    path = _model_file(tmp_path, body)
    _fails(capsys, ["compile", str(path), "--pass", "tucker", "-o", str(tmp_path / "out")], message)
    assert not (tmp_path / "out").exists()


def test_model_outputs_that_hold_logits_are_evaluated(tmp_path, capsys):
    body = (TINY.replace("return nn.Sequential(", "return Wrap(").replace("def model():", WRAP + "def model():")
            .replace("nn.Linear(8, 4))", "nn.Linear(8, 4), 'logits')") + EVAL)
    assert main(["compile", str(_model_file(tmp_path, body)), "--pass", "tucker", "-o", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["accuracy"]["after"] is not None


def test_plan_path_that_is_a_folder(tmp_path, capsys):
    _fails(capsys, ["compile", str(_model_file(tmp_path, TINY)), "--pass", "tucker", "--plan", str(tmp_path),
                    "-o", str(tmp_path / "o")], "is a folder")


def test_missing_model_file(tmp_path, capsys):
    _fails(capsys, ["compile", str(tmp_path / "nope.py"), "-o", str(tmp_path / "out")], "does not exist")


def test_untraceable_model(tmp_path, capsys):
    body = TINY.replace("def example_inputs", '''
class Odd(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x

def model():
    return Odd()

def example_inputs''')
    _fails(capsys, ["compile", str(_model_file(tmp_path, body)), "--pass", "tucker", "-o", str(tmp_path / "o")],
           "cannot trace Odd.forward")


@pytest.mark.parametrize("args,message", [
    (["--pass", "lower-conv-block-term"], "unknown pass 'lower-conv-block-term'"),
    (["--pass", "deeptwist{speed=2},train"], "has no option 'speed'"),
    (["--pass", "tucker", "--ratio", "1"], "ratio must be a finite number > 1"),
    (["--pass", "tucker", "--ratio", "inf"], "ratio must be a finite number > 1"),
    (["--pass", "lower-conv-tucker{energy=0}"], "energy must be in (0, 1]"),
    (["--pass", "lower-conv-tucker{energy=2}"], "energy must be in (0, 1]"),
    (["--pass", "lower-conv-tucker{round_to=0}"], "round_to must be >= 1"),
    (["--pass", "lower-conv-tucker{ratio=2,ratio=3}"], "option 'ratio' of lower-conv-tucker is given twice"),
    (["--pass", "deeptwist{decomp=tiled-svd,tile=0x0},train"], "tile must be two positive integers"),
    (["--pass", "deeptwist{decomp=tiled-svd,tile=-2x3},train"], "tile must be two positive integers"),
    (["--pass", "lower-conv-tiled-lowrank{tile=2x2x2,ratio=2}"], "tile must be two positive integers"),
    (["--pass", "lower-conv-tucker,train{momentum=-1}"], "momentum must be"),
    (["--pass", "lower-conv-tucker,train{weight_decay=-1}"], "weight_decay must be"),
    (["--pass", "lower-conv-tucker,train{optimizer=lion}"], "optimizer must be sgd or adamw"),
    (["--pass", "tucker", "--threads", "-1"], "--threads must be >= 1"),
    (["--pass", "lower-conv-tucker{layers=nothing*}"], "matches none of the model's layers (0, 2, 5)"),
    (["--pass", "tucker", "--resume"], "--resume needs --checkpoint"),
    (["--pass", "tucker", "--checkpoint-every", "5"], "--checkpoint-every must be >= 1 and comes with --checkpoint"),
    (["--pass", "lower-conv-tucker,train{checkpoint_every=5,epochs=1}"], "checkpoint_every needs a folder"),
    (["--pass", "lower-conv-tucker,train{checkpoint_every=-5}"], "checkpoint_every must be"),
    (["--pass", "lower-conv-tucker{ranks=0x2}"], "ranks must be >= 1"),
    (["--pass", "lower-conv-tucker{ranks=8x9}"], "r_in=9 is outside 1..3"),
    (["--pass", "tucker", "--set", "colour=red"], "takes option(s) colour"),
    (["--pass", "tucker", "--option", "colour=red"], "--option colour: no stage of the pipeline (lower, fold"),
    (["--pass", "deeptwist-tucker", "--option", "accumulate=0"], "accumulate must be >= 1"),
    (["--pass", "tucker", "--option", "accumulate"], "--option 'accumulate': write KEY=VALUE"),
])
def test_bad_pipelines_and_options(tmp_path, capsys, args, message):
    path = _model_file(tmp_path)
    _fails(capsys, ["compile", str(path), "-o", str(tmp_path / "out"), *args], message)
    assert not (tmp_path / "out").exists()


def test_deeptwist_without_train_data(tmp_path, capsys):
    _fails(capsys, ["compile", str(_model_file(tmp_path, TINY)), "--pass", "deeptwist-tucker",
                    "-o", str(tmp_path / "out")], "uses train_data(), which model.py does not define")


def test_output_that_is_a_file_or_the_input(tmp_path, capsys):
    path = _model_file(tmp_path)
    existing = tmp_path / "taken.txt"
    existing.write_text("keep me")
    _fails(capsys, ["compile", str(path), "--pass", "tucker", "-o", str(existing)], "is a file")
    _fails(capsys, ["compile", str(path), "--pass", "tucker", "-o", str(path)], "would overwrite the input")
    _fails(capsys, ["compile", str(path), "--pass", "tucker", "-o", str(tmp_path)], "would overwrite the input")
    assert existing.read_text() == "keep me"


def test_non_empty_output_needs_force(tmp_path, capsys):
    path = _model_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    _fails(capsys, ["compile", str(path), "--pass", "tucker", "-o", str(out)], "not empty")
    _fails(capsys, ["compile", str(path), "--pass", "tucker", "-o", str(out), "--force"], "did not write it")
    assert (out / "mine.txt").read_text() == "x"


def test_failed_onnx_check_writes_nothing(tmp_path, capsys, monkeypatch):
    real_run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: [o + 1 for o in real_run(self, *a, **k)])
    path = _model_file(tmp_path)
    _fails(capsys, ["compile", str(path), "--pass", "tucker", "-o", str(tmp_path / "out")],
           "onnxruntime differs from PyTorch")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.py"]  # no temporary directory left behind


def test_force_replaces_an_earlier_output(tmp_path, capsys):
    path = _model_file(tmp_path)
    out = tmp_path / "out"
    assert main(["compile", str(path), "--pass", "tucker", "-o", str(out), "--quiet"]) == 0
    first = (out / "report.json").read_text()
    assert main(["compile", str(path), "--pass", "tucker", "--ratio", "3", "-o", str(out), "--quiet", "--force"]) == 0
    assert (out / "report.json").read_text() != first


def test_bench_command_writes_results(tmp_path, capsys):
    path = _model_file(tmp_path)
    out = tmp_path / "out"
    assert main(["compile", str(path), "--pass", "tucker", "-o", str(out), "--quiet"]) == 0
    assert main(["bench", str(out / "original.onnx"), str(out / "model.onnx"), "--batch", "2", "--reps", "5",
                 "--warmup", "1", "--spin", "-o", str(tmp_path / "new" / "bench.json")]) == 0
    result = json.loads((tmp_path / "new" / "bench.json").read_text())
    assert [m["path"] for m in result["models"]] == [str(out / "original.onnx"), str(out / "model.onnx")]
    assert result["batch"] == 2 and result["spinning"] is True
    first, second = result["models"]
    # 5 repetitions, or 15 where the machine made the first 5 unsteady
    assert result["repetitions"] == len(second["samples_ms"]) in (5, 15) and first["speedup_vs_first"] == 1.0
    lo, hi = second["speedup_ci95"]
    assert lo <= second["speedup_vs_first"] <= hi
    assert main(["bench", str(out / "model.pt2"), str(out / "model.pt2"), "--runtime", "torch", "--provider", "cpu",
                 "--reps", "3", "--warmup", "1", "-o", str(tmp_path / "torch.json")]) == 0
    result = json.loads((tmp_path / "torch.json").read_text())
    assert result["runtime"] == "torch" and result["provider"] == "cpu" and len(result["models"][1]["samples_ms"]) == 3
    _fails(capsys, ["bench", str(tmp_path / "missing.onnx")], "does not exist")
    _fails(capsys, ["bench", str(out / "model.onnx"), "--provider", "cuda"], "CUDAExecutionProvider")


@pytest.mark.parametrize("args,lowering", [  # the RGB stem keeps all 27 values it reads and the Linear head a
    (["--pass", "deeptwist-svd", "--order", "tap-major"], [None, "svd-conv", None]),  # rank per class: both dense
    (["--pass", "deeptwist-tiled-svd", "--tile", "4x8"], [None, "tiled-lowrank", None]),
    (["--pass", "deeptwist-tiled-svd", "--grid", "2x3"], [None, "tiled-lowrank", None]),
])
def test_2d_presets(tmp_path, capsys, args, lowering):
    out = tmp_path / "out"
    assert main(["compile", str(_model_file(tmp_path)), "--epochs", "1", "--period", "1", "--ratio", "1.5",
                 "-o", str(out), "--quiet", *args]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [layer["lowering"] for layer in report["layers"]] == lowering
    assert report["training"]["distortions"] == 3
    plan = report["plan"]["2"]
    assert plan["order"] == ("tap-major" if "tap-major" in args else "channel-major")
    assert plan.get("tile") == ([4, 8] if "4x8" in args else None)


def test_tiled_preset_without_tiles_is_an_error(tmp_path, capsys):
    _fails(capsys, ["compile", str(_model_file(tmp_path)), "--pass", "deeptwist-tiled-svd", "-o", str(tmp_path / "o")],
           "needs exactly one of tile=HxW or grid=RxC")


def test_model_with_untraceable_child_still_compiles(tmp_path, capsys):
    body = TINY.replace("def model():", '''
class ShapeSwitch(nn.Module):
    """torch.fx cannot trace this (a Python branch on a traced shape); torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] > 4:
            return torch.relu(self.conv(x))
        return x


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ShapeSwitch(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def unused():''')
    out = tmp_path / "out"
    assert main(["compile", str(_model_file(tmp_path, body)), "--pass", "tucker", "-o", str(out), "--quiet"]) == 0
    assert "kept 1 as an opaque leaf" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["2"]["lowering"] == "tucker-chain" and layers["0"]["skip_reason"].startswith("the model's stem")
    assert layers["1.conv"]["lowering"] is None and "inside untraceable module 1" in layers["1.conv"]["skip_reason"]
    assert list(report["leaves"]) == ["1"]


def test_unexportable_model_is_a_clear_error(tmp_path, capsys):
    body = TINY.replace("def model():", '''
class ValueSwitch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ValueSwitch(), nn.Conv2d(8, 8, 3, padding=1))


def unused():''')
    _fails(capsys, ["compile", str(_model_file(tmp_path, body)), "--pass", "tucker", "-o", str(tmp_path / "o")],
           "torch.onnx cannot export")


WIDE = '''
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4))

def example_inputs():
    return (torch.randn(1, 3, 32, 32),)
'''


def _injected_latencies(monkeypatch, speedup, ci, trustworthy=True):
    """Layer timings from a table (dense 1 ms, a lowered form in proportion to its ranks), the whole model
    1 ms plus its layers, and the compile's check measuring `speedup`: nothing depends on the machine."""
    from twistc.passes import plan_latency
    monkeypatch.setattr(plan_latency, "measure_layer", lambda shape, entries, *a, **k: [
        1.0 if e is None else 0.9 * sum(e.ranks) / (shape.out_channels + shape.in_channels) for e in entries])
    monkeypatch.setattr(plan_latency.PlanLatency, "model_ms", lambda self, gm, runtime, cache: 1.0 + sum(
        1.0 for _ in plan_latency.conv_sites(gm)))
    monkeypatch.setattr(plan_latency.PlanLatency, "planned_ms", lambda self, gm, sites, options, picks, model_ms, *a:
                        model_ms - sum(o[0][1] - o[i][1] for o, i in zip(options, picks)))
    problems = [] if trustworthy else ["paired ratios spread 80% (at most 25% is steady)"]
    monkeypatch.setattr(commands, "compare_models", lambda timers, reps, threads: {
        "median_ms": [1.0, 1.0 / speedup], "speedup": speedup, "speedup_ci95": ci, "reps": reps,
        "samples_ms": [[1.0], [1.0 / speedup]], "trustworthy": trustworthy, "problems": problems, "sampling": {}})


def test_target_speedup_plans_by_measured_latency_and_a_missed_target_is_a_warning(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _injected_latencies(monkeypatch, 1.2, [1.15, 1.25])
    argv = ["compile", str(_model_file(tmp_path, WIDE)), "--pass", "tucker", "--target-speedup", "1.5",
            "--epochs", "0", "--threads", "1", "--latency-cache", str(tmp_path / "latency.json"), "-o", str(out),
            "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"].startswith("plan-latency{speedup=1.5,threads=1,cache=")
    assert report["pipeline"].endswith("lower,fold,cleanup")
    latency = report["latency"]
    assert latency["runtime"]["threads"] == 1 and latency["predicted_speedup"] >= 1.5
    lowered = [layer for layer in report["layers"] if layer["lowering"]]
    assert lowered and all(layer["latency_after"] < layer["latency_before"] for layer in lowered)
    captured = capsys.readouterr()
    assert "predicted" in captured.out
    assert re.search(r"warning: the target speedup 1.50x was missed: planned 1.\d\dx, measured 1.20x \(95% CI "
                     r"1.15-1.25\) in ort cpu, 1 thread\(s\), batch 1; the layers the plan counted on most: ",
                     captured.err), captured.err


def test_an_untrustworthy_timing_is_flagged_not_printed_with_a_tight_interval(tmp_path, capsys, monkeypatch):
    _injected_latencies(monkeypatch, 11.3, [8.98, 11.77], trustworthy=False)
    out = tmp_path / "out"
    assert main(["compile", str(_model_file(tmp_path)), "--pass", "tucker", "--epochs", "0", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: the machine is too busy for a trustworthy timing (paired ratios spread 80%" in captured.err
    assert "(11.30x, NOT TRUSTWORTHY: paired ratios spread 80%" in captured.out and "95% CI" not in captured.out
    measured = json.loads((out / "report.json").read_text())["latency"]["measured"]
    assert measured["trustworthy"] is False and measured["problems"]


def test_max_drop_plans_the_fastest_model_within_an_accuracy_drop(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compile", str(_model_file(tmp_path, WIDE + EVAL)), "--pass", "tucker", "--max-drop", "0.5",
            "--epochs", "0", "--latency-cache", str(tmp_path / "latency.json"), "--no-timing", "-o", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"].startswith("calibrate,plan-latency{max_drop=0.5,")  # no training: data-aware factors
    latency = report["latency"]
    assert "measured" not in latency and latency["predicted_speedup"] > 1  # --no-timing: the prediction alone
    drop = latency["accuracy_drop"]
    assert drop["samples"] == 4 and drop["measured"] <= 0.5
    assert report["accuracy"]["before"] - report["accuracy"]["after"] == pytest.approx(drop["measured"])
    assert "the plan's accuracy drop before training" in capsys.readouterr().out
    _fails(capsys, ["compile", str(_model_file(tmp_path, WIDE, "no_eval.py")), "--pass", "tucker", "--max-drop",
                    "0.5", "-o", str(tmp_path / "o")],
           "uses eval_data(), which no_eval.py does not define")
    with pytest.raises(SystemExit):  # one target at a time
        main(argv + ["--target-speedup", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_plan_naming_missing_layers_is_an_error(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"conv9": {"decomp": "none"}}))
    _fails(capsys, ["compile", str(_model_file(tmp_path)), "--pass", "tucker", "--plan", str(plan),
                    "-o", str(tmp_path / "o")], "names layers the model does not have (conv9)")


def test_empty_train_data_is_an_error(tmp_path, capsys):
    body = TINY + "\ndef train_data():\n    return []\n"
    _fails(capsys, ["compile", str(_model_file(tmp_path, body)), "--pass", "tucker", "--epochs", "1",
                    "-o", str(tmp_path / "o")], "train_data() yielded no batches in epoch 1")


@pytest.mark.parametrize("flag, value", [("--reps", "0"), ("--batch", "-1"), ("--threads", "0"), ("--warmup", "-1")])
def test_bad_bench_options(tmp_path, capsys, flag, value):
    _fails(capsys, ["bench", str(tmp_path / "a.onnx"), flag, value], f"{flag} must be >=")


def test_target_speedup_needs_a_tucker_preset(tmp_path, capsys):
    _fails(capsys, ["compile", str(_model_file(tmp_path)), "--pass", "lower-conv-svd,cleanup", "--target-speedup",
                    "2", "-o", str(tmp_path / "o")], "--target-speedup applies to the presets")


def test_passes_name_lists_the_options(capsys):
    assert main(["passes", "plan-latency"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("plan-latency: planning:")
    assert any(line.split()[:3] == ["steps", "int", "8"] for line in text.splitlines())
    assert any(line.split()[:4] == ["speedup", "float", "|", "None"] for line in text.splitlines())
    _fails(capsys, ["passes", "nope"], "unknown pass 'nope'")


def test_every_option_of_every_pass_says_what_it_means():
    import dataclasses

    from twistc.pipeline import registry

    for name, cls in registry().items():
        missing = [f.name for f in dataclasses.fields(cls) if not cls.option_help.get(f.name)]
        assert not missing, f"{name}: {missing}"


def test_status_lines_go_to_a_terminal_only(tmp_path, capsys, monkeypatch):
    path = _model_file(tmp_path)
    assert main(["compile", str(path), "--pass", "tucker", "--no-timing", "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.splitlines()  # not a terminal: the summary on stdout, no status lines
    assert all(line.startswith("twistc: warning: ") for line in err), err  # (ranks that overshoot: warnings)
    # (--no-timing: this tiny model's lowered form may time slower, and that warning would go to stderr)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["compile", str(path), "--pass", "tucker", "-o", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "twistc: running calibrate" in err  # no training, train_data(): factors fitted to the data
    assert "twistc: running lower{fit=activation,ratio=2}" in err
    assert "twistc: exporting model.onnx and checking it in onnxruntime" in err
    assert "twistc: timing the original and the compiled model (ort cpu, 1 thread(s), batch 1)" in err


def test_eval_reports_the_accuracy_of_an_onnx_file(tmp_path, capsys):
    body = TINY + TRAIN + "\ndef eval_data():\n    return train_data()\n"
    path = _model_file(tmp_path, body)
    out = tmp_path / "out"
    assert main(["compile", str(path), "--pass", "tucker", "-o", str(out), "--quiet"]) == 0
    expected = json.loads((out / "report.json").read_text())["accuracy"]["after"]
    capsys.readouterr()
    assert main(["eval", str(path), str(out / "model.onnx")]) == 0
    assert f"top-1 accuracy {expected:.2%} (" in capsys.readouterr().out
    _fails(capsys, ["eval", str(_model_file(tmp_path, TINY, "plain.py")), str(out / "model.onnx")],
           "defines no eval_data()")
    _fails(capsys, ["eval", str(path), str(tmp_path / "missing.onnx")], "does not exist")


@pytest.mark.parametrize("dtype, onnx_dtype, atol", [("float16", "float16", 1e-2), ("bfloat16", "float32", 1e-4),
                                                    ("float64", "float32", 1e-4)])
def test_models_compile_in_their_own_dtype(tmp_path, capsys, dtype, onnx_dtype, atol):
    body = (TINY.replace("nn.Linear(8, 4))", f"nn.Linear(8, 4)).to(torch.{dtype})")
            .replace("torch.randn(1, 3, 8, 8)", f"torch.randn(1, 3, 8, 8, dtype=torch.{dtype})") + (EVAL + TRAIN).replace(
                "torch.randn(4, 3, 8, 8, generator=g)", f"torch.randn(4, 3, 8, 8, generator=g).to(torch.{dtype})"))
    out = tmp_path / "o"
    assert main(["compile", str(_model_file(tmp_path, body)), "--pass", "deeptwist-tucker", "--ratio", "2",
                 "--epochs", "1", "--period", "2", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["distortions"] >= 1
    assert report["onnx"]["model_dtype"] == dtype and report["onnx"]["dtype"] == onnx_dtype
    assert report["onnx"]["atol"] == atol and report["accuracy"]["after"] is not None
    program = torch.export.load(str(out / "model.pt2"))
    assert {p.dtype for p in program.state_dict.values()} == {getattr(torch, dtype)}
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == f"tensor({'float' if onnx_dtype == 'float32' else onnx_dtype})"


def test_non_finite_outputs_are_named_as_such(tmp_path, capsys):
    body = TINY.replace("    return nn.Sequential(", "    net = nn.Sequential(").replace(
        "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))",
        "nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))\n"
        "    with torch.no_grad():\n        net[5].weight[0, 0] = float('nan')\n    return net")
    _fails(capsys, ["compile", str(_model_file(tmp_path, body)), "--pass", "tucker", "-o", str(tmp_path / "o")],
           "non-finite output (PyTorch gives NaN or inf")


def test_vbmf_ranks_from_the_command_line(tmp_path):
    out = tmp_path / "o"
    assert main(["compile", str(_model_file(tmp_path, TINY)), "--pass", "lower-conv-tucker{rank=vbmf},cleanup",
                 "-o", str(out), "--quiet"]) == 0
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert all(layer["ranks"] or layer["skip_reason"] for layer in layers)


@pytest.mark.slow
def test_compile_the_transformer_example_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert main(["compile", str(REPO / "examples" / "digits_transformer.py"), "--pass", "deeptwist-svd", "--ratio", "2",
                 "--epochs", "1", "--period", "10", "--set", "pretrain_epochs=1", "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    lowered = {layer["name"]: layer["lowering"] for layer in report["layers"]}
    assert lowered["blocks.0.attention.q"] == lowered["blocks.1.mlp.2"] == "svd-linear"
    assert lowered["patches"] is None and lowered["head"] is None  # the 10-class head keeps its 10 ranks, and
    reasons = {layer["name"]: layer.get("skip_reason") for layer in report["layers"]}  # the stem its 4 pixels
    assert reasons["head"].startswith("the model's head: it keeps a rank per output (10)")
    assert reasons["patches"].startswith("the model's stem: it keeps its 1 input channel and every value it reads (4 with its 2x2 taps)")
    assert all(layer["ratio_achieved"] >= 2 for layer in report["layers"] if layer["lowering"])
    assert report["onnx"]["max_abs_diff"] < 1e-4 and report["training"]["distortions"] >= 1


@pytest.mark.parametrize("spec, message", [
    ("deeptwist,lower-conv-tucker,cleanup", "deeptwist needs a train stage with epochs > 0 after it"),
    ("lower-conv-tucker,fold,train,cleanup", "fold freezes BatchNorm into the convs, so it goes after train"),
    ("plan-latency{ratio=2,objective=eval},lower",
     "uses eval_data(), which model.py does not define"),
    ("plan-latency{ratio=2},lower-conv-tucker,lower-conv-svd",
     "may choose svd-linear, which no later pass lowers: add lower after it, or give "
     "forms=tucker-chain|svd-conv"),
])
def test_each_pass_checks_its_place_in_the_pipeline(tmp_path, capsys, spec, message):
    _fails(capsys, ["compile", str(_model_file(tmp_path)), "--pass", spec, "-o", str(tmp_path / "o")], message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, fitted", [
    ([], True),                                   # no training, data in MODEL.py: factors fitted to the data
    (["--fit", "weight"], False),                 # asked for the kernel fit
    (["--epochs", "1"], False),                   # fine-tuning evens the fits out: the kernel fit, no calibration
])
def test_a_compile_that_does_not_train_fits_its_factors_to_the_data_by_default(tmp_path, capsys, extra, fitted):
    out = tmp_path / "out"
    argv = ["compile", str(_model_file(tmp_path, WIDE + EVAL + TRAIN)), "--pass", "tucker", "--ratio", "2",
            "--no-timing", "-o", str(out), *extra]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["pipeline"].startswith("calibrate,") == fitted
    fits = {layer["fit"] for layer in report["layers"] if layer["lowering"]}
    assert fits == ({"activation"} if fitted else {"weight"})
