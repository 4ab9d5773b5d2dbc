"""The zoo's report: layer kinds, and what capped a model's speed, read from twistc's own messages."""
import zoo


def _layer(kind, shape, groups=1):
    return {"kind": kind, "shape": shape, "groups": groups}


def test_layers_are_sorted_into_the_kinds_the_table_counts():
    assert zoo.kind_of(_layer("Linear", [10, 64, 1, 1])) == "Linear"
    assert zoo.kind_of(_layer("Conv2d", [32, 1, 3, 3], groups=32)) == "depthwise"
    assert zoo.kind_of(_layer("Conv2d", [32, 8, 3, 3], groups=4)) == "grouped"
    assert zoo.kind_of(_layer("Conv2d", [32, 16, 1, 1])) == "1x1 conv"
    assert zoo.kind_of(_layer("Conv2d", [32, 16, 3, 3])) == "kxk conv"


def test_a_refusal_is_read_back_as_what_capped_it():
    before = ("twistc: error: plan-latency: speedup 1.5 is out of reach in ort/cpu: the fastest candidates give 1.31x "
              "(they save 1.234 of the model's 5.000 ms); 38% of the model's time is outside the layers some form "
              "makes faster (17 layers no form speeds up: a, b, c, ..., and the operations between layers), so even "
              "compressed layers that took no time would give at most 2.60x; ask for less")
    after = ("twistc: error: plan-latency: speedup 1.5 is out of reach in ort/cpu: the best plan, lowered and timed "
             "whole (2 rounds), gives 1.36x; 28% of the model's time is outside the layers some form makes faster "
             "(14 layers no form speeds up), so even compressed layers that took no time would give at most 3.58x; "
             "ask for at most 1.36x")
    assert zoo.cap({"rc": 2, "error": before}) == ("refused: candidates give 1.31x; 38% of the time in layers no "
                                                   "form speeds up (at most 2.60x)")
    assert zoo.cap({"rc": 2, "error": after}) == ("refused: its plan timed whole gives 1.36x; 28% of the time in "
                                                  "layers no form speeds up (at most 3.58x)")
    missed = {"rc": 0, "setting": "speedup1.25", "measured_speedup": 1.15, "warnings": []}
    assert zoo.cap(missed) == "missed: 1.15x measured for 1.25x"
    assert zoo.cap({**missed, "measured_speedup": 1.21}) == "-"  # within 5%


def _run(model, cpu, speedup):
    return {"model": model, "setting": "ratio2", "rc": 0, "seconds": 10.0, "kinds": {"1x1 conv": {"lowered": 2}},
            "compressed_weights": [200, 100], "macs": [300, 200], "measured_speedup": speedup,
            "measured_ci95": [speedup - 0.01, speedup + 0.01], "trustworthy": True, "predicted_speedup": None,
            "plan_seconds": None, "cold_cache": False, "machine": {"cpu": cpu}, "warnings": [],
            "command": "python tools/zoo.py", "compile": f"twistc compile {model}"}


def test_rows_timed_on_another_machine_name_it(tmp_path):
    store = zoo.expkit.RunStore(tmp_path)
    runs = [("ResNet-18", "Intel Xeon"), ("ResNet-50", "Intel Xeon"), ("ViT-Tiny", "AMD EPYC")]
    for i, (model, cpu) in enumerate(runs):
        store.save(f"run{i}", _run(model, cpu, 1.2 + i / 10))
    zoo.report(store)
    text = (tmp_path / "results.md").read_text()
    assert "timed in onnxruntime on Intel Xeon (a row that names another machine ran there)" in text
    assert "| ViT-Tiny | ratio2 | 1x1 conv 2/2 | 2.00x | 1.50x | - | 1.40x [1.39, 1.41] on AMD EPYC |" in text
    assert "| ResNet-18 | ratio2 | 1x1 conv 2/2 | 2.00x | 1.50x | - | 1.20x [1.19, 1.21] |" in text
