"""No user file is ever removed or overwritten by writing a compile's outputs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twistc.cli import main
from twistc.errors import SpecError
from twistc.outdir import MARKER, OutputDir, check_output

TINY = '''
import time
import torch
from torch import nn

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

def example_inputs():
    return (torch.randn(1, 3, 8, 8),)
'''


def _write(out: Path, protected: Path, force=False, files=("model.onnx", "report.json")) -> Path:
    writer = OutputDir(out, protected, force)
    with writer as tmp:
        for name in files:
            (tmp / name).write_text(name)
        return writer.commit()


def test_fresh_output_is_marked_and_leaves_nothing_beside_it(tmp_path):
    out = tmp_path / "out"
    _write(out, tmp_path / "model.py")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "model.onnx", "report.json"])
    assert json.loads((out / MARKER).read_text())["files"] == ["model.onnx", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_named_like_the_old_backup_survives(tmp_path):
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "keep.txt").write_text("mine")
    (tmp_path / "out").mkdir()
    _write(tmp_path / "out", tmp_path / "model.py")
    assert (tmp_path / ".out.old" / "keep.txt").read_text() == "mine"


def test_force_never_removes_files_twistc_did_not_write(tmp_path):
    out = tmp_path / "out"
    _write(out, tmp_path / "model.py")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SpecError, match="did not write.*notes.txt"):
        check_output(out, tmp_path / "model.py", force=True)
    # a folder with a report.json but no marker is not twistc's
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text("{}")
    with pytest.raises(SpecError, match="did not write it"):
        check_output(other, tmp_path / "model.py", force=True)
    assert (out / "notes.txt").read_text() == "mine" and (other / "report.json").read_text() == "{}"


def test_force_replaces_own_files_and_drops_own_stale_ones(tmp_path):
    out = tmp_path / "out"
    _write(out, tmp_path / "model.py", files=("model.onnx", "old.md"))
    with pytest.raises(SpecError, match="pass --force"):
        check_output(out, tmp_path / "model.py", force=False, names=("model.onnx",))
    writer = OutputDir(out, tmp_path / "model.py", force=True)
    with writer as tmp:
        (tmp / "model.onnx").write_text("new")
        writer.commit()
    assert (out / "model.onnx").read_text() == "new" and not (out / "old.md").exists()


def test_a_file_that_appears_during_the_run_survives(tmp_path):
    out = tmp_path / "out"
    writer = OutputDir(out, tmp_path / "model.py", force=True)
    with writer as tmp:
        (tmp / "model.onnx").write_text("twistc")
        out.mkdir()  # another program writes into OUTDIR while twistc works
        (out / "model.onnx").write_text("user")
        with pytest.raises(SpecError, match="did not write"):
            writer.commit()
    assert (out / "model.onnx").read_text() == "user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_move_never_replaces_a_file_created_after_the_check(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer = OutputDir(out, tmp_path / "model.py", force=False)
    real_link = os.link

    def racing_link(src, dst):  # the user's file lands between the check and the move
        if Path(dst).name == "report.json":
            Path(dst).write_text("user")
        return real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with writer as tmp:
        (tmp / "model.onnx").write_text("twistc")
        (tmp / "report.json").write_text("twistc")
        with pytest.raises(SpecError, match="appeared while twistc was running"):
            writer.commit()
    assert (out / "report.json").read_text() == "user"
    assert not (out / "model.onnx").exists()  # what this run had added was rolled back


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _write(tmp_path / "out", tmp_path / "model.py")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "model.onnx").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("make, message", [
    (lambda p: p.symlink_to(p.parent / "missing"), "dangling"),
    (lambda p: None, "which is a file"),
])
def test_bad_output_paths_are_refused_up_front(tmp_path, capsys, make, message):
    model = tmp_path / "model.py"
    model.write_text(TINY)
    target = tmp_path / "link"
    make(target)
    if message == "which is a file":
        (tmp_path / "plain").write_text("x")
        target = tmp_path / "plain" / "out"
    assert main(["compile", str(model), "--pass", "tucker", "-o", str(target), "--quiet"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_leaves_no_temporary_folder(tmp_path):
    model = tmp_path / "model.py"
    model.write_text(TINY + '''
def train_data():
    time.sleep(0.5)
    return [(torch.randn(2, 3, 8, 8), torch.randint(0, 8, (2,))) for _ in range(2)]
''')
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "twistc.cli", "compile", str(model), "--pass", "tucker",
                             "--epochs", "1000", "-o", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.twistc-tmp.") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.py"]
