import os

import pytest
import torch

from twistc.decomp import threads


@pytest.fixture
def four_threads(monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(previous)


def _window(monkeypatch, others: float, seconds: float = 4.0, own: float = 0.5, proc_stat: bool = True):
    """The next measurement sees `seconds` in which this process kept `own` cores busy and others `others`."""
    monkeypatch.setattr(threads, "_last", (0.0, 0.0, 100.0 if proc_stat else None))
    monkeypatch.setattr(threads, "_sample", lambda: (seconds, own * seconds,
                                                     100.0 + (own + others) * seconds if proc_stat else None))


def test_decompositions_use_the_cores_other_processes_keep_free(monkeypatch, four_threads):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # stale load: not what counts here
    for others, expected in ((0.0, 4), (0.4, 4), (2.0, 2), (3.1, 1), (9.0, 1)):
        _window(monkeypatch, others)
        assert threads.free_cores() == expected
        _window(monkeypatch, others)
        with threads.on_free_cores():
            assert torch.get_num_threads() == expected
        assert torch.get_num_threads() == 4


@pytest.mark.parametrize("proc_stat, seconds", [(False, 4.0), (True, 0.5)])
def test_without_proc_stat_or_in_a_short_window_the_load_average_decides(monkeypatch, four_threads, proc_stat,
                                                                         seconds):
    monkeypatch.setattr(threads, "own_load", lambda: 0.5)
    for load, expected in ((0.5, 4), (2.5, 2), (3.6, 1), (9.0, 1)):  # load includes our own 0.5
        _window(monkeypatch, 0.0, seconds, proc_stat=proc_stat)
        monkeypatch.setattr(threads.os, "getloadavg", lambda load=load: (load, load, load))
        assert threads.free_cores() == expected


def test_without_either_decompositions_use_torch_threads(monkeypatch):
    def missing():
        raise OSError

    _window(monkeypatch, 0.0, proc_stat=False)
    monkeypatch.setattr(threads.os, "getloadavg", missing)
    assert threads.free_cores() == torch.get_num_threads()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc/stat only")
def test_busy_seconds_come_from_proc_stat_and_only_grow():
    first = threads.busy_seconds()
    sum(i * i for i in range(200_000))  # some work of our own
    assert first is not None and 0 < first <= threads.busy_seconds()
