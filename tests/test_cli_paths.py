"""Every path a compile writes is checked before the model is built; a write that fails is one line and
leaves what the user had."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models_for_tests import TINY_MODEL_PY
from twistc.cli import main

TRAIN = '''
def train_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(3)]
'''
# a model() that leaves a trace, so that a test can tell whether it was built
BUILT = '''
import pathlib
_model = model
def model():
    pathlib.Path(__file__).with_name("built").write_text("yes")
    return _model()
'''


@pytest.fixture
def model_py(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(TINY_MODEL_PY + TRAIN + BUILT)
    return path


def _refused(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("twistc: error: ") and message in err[0], err
    return err[0]


def _cases(tmp: Path) -> dict:
    (tmp / "file").write_text("mine")
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "checkpoint.pt").write_bytes(b"x")
    (tmp / "notes.json").write_text('{"mine": 1}')
    return {
        "checkpoint-is-a-file": (["--epochs", "1", "--checkpoint", str(tmp / "file")], "is a file; give a folder"),
        "checkpoint-names-the-file": (["--epochs", "1", "--checkpoint", str(tmp / "ckpt" / "checkpoint.pt")],
                                      "names the checkpoint file itself; give its folder"),
        "checkpoint-under-a-file": (["--epochs", "1", "--checkpoint", str(tmp / "file" / "c")], "which is a file"),
        "checkpoint-is-the-output": (["--epochs", "1", "--checkpoint", str(tmp / "out")], "name the same path"),
        "checkpoint-inside-the-output": (["--epochs", "1", "--checkpoint", str(tmp / "out" / "c")],
                                         "lies inside the output folder"),
        "checkpoint-without-training": (["--pass", "tucker", "--epochs", "0", "--checkpoint", str(tmp / "c")],
                                        "has no train stage to checkpoint"),
        "cache-is-a-users-file": (["--target-speedup", "1.2", "--latency-cache", str(tmp / "notes.json")],
                                  "is not a twistc latency cache"),
        "cache-is-the-input": (["--target-speedup", "1.2", "--latency-cache", str(tmp / "model.py")],
                               "is not a twistc latency cache"),
        "cache-is-a-folder": (["--target-speedup", "1.2", "--latency-cache", str(tmp / "ckpt")], "is a folder"),
        "cache-under-a-file": (["--target-speedup", "1.2", "--latency-cache", str(tmp / "file" / "c.json")],
                               "which is a file"),
        "cache-without-planning": (["--latency-cache", str(tmp / "c.json")], "has no plan-latency stage"),
        "plan-is-a-folder": (["--plan", str(tmp / "ckpt")], "is a folder; give the plan's JSON file"),
    }


@pytest.mark.parametrize("case", [
    "checkpoint-is-a-file", "checkpoint-names-the-file", "checkpoint-under-a-file", "checkpoint-is-the-output",
    "checkpoint-inside-the-output", "checkpoint-without-training", "cache-is-a-users-file", "cache-is-the-input",
    "cache-is-a-folder", "cache-under-a-file", "cache-without-planning", "plan-is-a-folder"])
def test_bad_paths_are_refused_before_the_model_is_built(tmp_path, capsys, model_py, case):
    flags, message = _cases(tmp_path)[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    _refused(capsys, ["compile", str(model_py), "-o", str(tmp_path / "out"), "--quiet", *flags], message)
    assert not (tmp_path / "built").exists()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed


def test_a_read_only_checkpoint_folder_is_refused_before_training(tmp_path, capsys, model_py):
    if os.geteuid() == 0:
        pytest.skip("root may write in a read-only folder")
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    _refused(capsys, ["compile", str(model_py), "--epochs", "1", "--checkpoint", str(folder / "c"), "-o",
                      str(tmp_path / "out")], "may not write in")
    assert not (tmp_path / "built").exists()


def test_a_file_size_limit_during_export_is_one_line_and_writes_nothing(tmp_path, model_py):
    script = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000)); "
              f"from twistc.cli import main; sys.exit(main(['compile', {str(model_py)!r}, '--pass', 'tucker', "
              f"'--epochs', '0', '-o', {str(tmp_path / 'out')!r}, '--quiet']))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1].startswith("twistc: error: cannot write") and \
        "File too large" in lines[-1], run.stderr[-2000:]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.twistc-tmp.*"))


def test_argument_errors_are_one_line_and_debug_goes_anywhere(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["compile", "m.py", "--no-such-flag"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "unrecognized arguments: --no-such-flag" in err[0]
    assert main(["passes", "no-such-pass", "--debug"]) == 2  # --debug after the command is accepted
    assert main(["passes", "deeptwist-tucker"]) == 0
    assert "= deeptwist{decomp=natural},train,lower,fold,cleanup" in capsys.readouterr().out
