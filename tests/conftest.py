import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _quiet_machine(monkeypatch):
    """The machine's load as timings see it is 0, so that no test depends on what else the machine runs;
    tests of busy machines set it themselves."""
    from twistc import timing
    monkeypatch.setattr(timing, "load", lambda: 0.0)
