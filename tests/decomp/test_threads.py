import torch

from twistc.decomp import threads


def test_decompositions_use_the_cores_other_work_leaves_free(monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "own_load", lambda: 0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for load, expected in ((0.5, 4), (2.5, 2), (3.6, 1), (9.0, 1)):  # load includes our own 0.5
            monkeypatch.setattr(threads.os, "getloadavg", lambda load=load: (load, load, load))
            assert threads.free_cores() == expected
            with threads.on_free_cores():
                assert torch.get_num_threads() == expected
            assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(previous)


def test_without_a_load_average_decompositions_use_torch_threads(monkeypatch):
    def missing():
        raise OSError

    monkeypatch.setattr(threads.os, "getloadavg", missing)
    assert threads.free_cores() == torch.get_num_threads()
