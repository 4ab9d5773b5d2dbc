"""The latency cache never writes over a user's file, loses nothing to a concurrent compile, leaves no
temporary file behind and distrusts what a busy machine measured."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from twistc.errors import SpecError
from twistc.latency_cache import LatencyCache
from twistc.timing import Sampling


@pytest.mark.parametrize("content", [b'{"name": "my settings"}', b"notes\n", b"\x00\x01binary", b"[1, 2]"])
def test_a_path_holding_anything_else_is_refused_and_left_byte_identical(tmp_path, content):
    path = tmp_path / "mine.json"
    path.write_bytes(content)
    for make in (LatencyCache, LatencyCache.check):
        with pytest.raises(SpecError, match="is not a twistc latency cache; twistc will not write over it"):
            make(path)
    assert path.read_bytes() == content


@pytest.mark.parametrize("where, message", [("folder", "is a folder"), ("under-file", "which is a file"),
                                            ("read-only", "may not write in")])
def test_unwritable_paths_are_refused_before_anything_is_measured(tmp_path, where, message):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root may write in a read-only folder")
    if where == "folder":
        path = tmp_path
    elif where == "under-file":
        (tmp_path / "f").write_text("x")
        path = tmp_path / "f" / "c.json"
    else:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o500)
        path = folder / "c.json"
    with pytest.raises(SpecError, match=message):
        LatencyCache.check(path)


def test_non_finite_and_broken_entries_are_dropped_and_measured_again(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"format": 2, "entries": {"a": {"ms": float("nan"), "spread": 0},
                                                         "b": {"ms": "x"}, "c": {"ms": -1.0, "spread": 0},
                                                         "d": {"ms": 2.0, "spread": 0.01, "load": 0, "cores": 2}}}))
    cache = LatencyCache(path)
    assert [cache.get(k) for k in "abcd"] == [None, None, None, 2.0]


def test_entries_measured_on_a_busy_machine_are_measured_again(tmp_path):
    path = tmp_path / "c.json"
    cache = LatencyCache(path)
    cache.put("steady", 1.0, Sampling(spread=0.05, load=0.5, cores=2, threads=1))
    cache.put("busy", 1.0, Sampling(spread=0.05, load=3.5, cores=2, threads=1))  # another 2-thread job
    cache.put("unsteady", 1.0, Sampling(spread=0.6, load=0.0, cores=2, threads=1))
    cache.save()
    again = LatencyCache(path)
    assert again.get("steady") == 1.0 and again.get("busy") is None
    assert again.get("unsteady") == 1.0 and again.entries["unsteady"]["spread"] == 0.6  # kept, with its record
    # a format-1 cache (medians without a record of how they were taken) is read, and its entries re-measured
    path.write_text(json.dumps({"format": 1, "entries": {"old": 1.5}}))
    assert LatencyCache(path).get("old") is None


def _save_many(path: str, prefix: str, go) -> None:
    go.wait()
    for i in range(20):
        cache = LatencyCache(path)
        cache.put(f"{prefix}{i}", 1.0 + i, Sampling(threads=1, load=0.0))
        cache.save()


def test_two_processes_saving_one_cache_keep_both_sets_of_entries(tmp_path):
    path = str(tmp_path / "c.json")
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    workers = [ctx.Process(target=_save_many, args=(path, p, go)) for p in "ab"]
    for w in workers:
        w.start()
    go.set()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    entries = json.loads(open(path).read())["entries"]
    assert set(entries) == {f"{p}{i}" for p in "ab" for i in range(20)}
    assert not list(tmp_path.glob(".c.json.twistc-*.tmp"))


KILLED_SAVE = """
import os, signal, sys
from twistc import files
real = files.os.replace
def die(src, dst):  # the temporary file is complete, the rename not done: a SIGKILL now
    os.kill(os.getpid(), signal.SIGKILL)
files.os.replace = die
from twistc.latency_cache import LatencyCache
cache = LatencyCache(sys.argv[1])
cache.put("k", 1.0)
cache.save()
"""


def test_a_save_killed_by_sigkill_leaves_the_old_cache_and_the_next_save_removes_its_temp_file(tmp_path):
    path = tmp_path / "c.json"
    first = LatencyCache(path)
    first.put("old", 2.0)
    first.save()
    before = path.read_bytes()
    run = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path)], timeout=120)
    assert run.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".c.json.twistc-*.tmp"))) == 1 and path.read_bytes() == before
    cache = LatencyCache(path)
    cache.put("new", 3.0)
    cache.save()
    assert not list(tmp_path.glob(".c.json.twistc-*.tmp"))
    assert set(json.loads(path.read_text())["entries"]) == {"old", "new"}


def test_a_file_size_limit_during_a_save_is_one_line_and_keeps_the_cache(tmp_path):
    path = tmp_path / "c.json"
    cache = LatencyCache(path)
    cache.put("old", 2.0)
    cache.save()
    before = path.read_bytes()
    script = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from twistc.latency_cache import LatencyCache
from twistc.errors import SpecError
cache = LatencyCache({str(path)!r})
for i in range(2000):
    cache.put("k" * 50 + str(i), 1.0)
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) + 100}, {len(before) + 100}))
try:
    cache.save()
except SpecError as e:
    print(e)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"cannot write latency cache {path}: File too large; the cache keeps its earlier")
    assert path.read_bytes() == before and not list(tmp_path.glob(".c.json.twistc-*.tmp"))
