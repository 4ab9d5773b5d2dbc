"""Training on a GPU: these run where torch sees CUDA (tools/gpu_batch.sh runs the suite on the GPU machine)."""
import signal

import pytest
import torch

from test_checkpoint import Data, _deeptwist_model, _run
from twistc import checkpoint
from twistc.errors import Stopped
from twistc.resume import Checkpointing
from twistc.train import projections, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU here")


def _close(a, b, tol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(y, x, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_trains_on_the_gpu_and_hands_back_float32_weights_on_the_cpu(amp):
    gm = _deeptwist_model()
    data = Data()
    result = train(gm, lambda: data(), 2, lr=0.05, progress=False, device="cuda", amp=amp)
    assert (result.steps, result.distortions) == (10, 3) and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in gm.parameters())
    assert [int(p.step) for p in projections(gm)] == [10, 10]


def test_gpu_training_follows_cpu_training():
    on_cpu, cpu_result = _run(None, epochs=2)
    on_gpu = _deeptwist_model()
    data = Data()
    gpu_result = train(on_gpu, lambda: data(), 2, lr=0.05, seed=3, progress=False, finalize=False, device="cuda")
    assert gpu_result.distortions == cpu_result.distortions
    _close(on_cpu, on_gpu, 1e-3)


def test_a_run_stopped_on_the_gpu_goes_on_on_the_cpu(tmp_path):
    reference, _ = _run(None)
    gm = _deeptwist_model()
    cp = Checkpointing(tmp_path, checkpoint.identity("deeptwist,train{device=cuda}", gm), resume=False)
    data = Data(stop_at=7)
    with pytest.raises(Stopped) as stopped:
        train(gm, lambda: data(), 3, lr=0.05, seed=3, progress=False, finalize=False, checkpointing=cp, device="cuda")
    assert stopped.value.signum == signal.SIGTERM
    resumed, result = _run(tmp_path, resume=True)  # the same pipeline, on the CPU
    assert (result.steps, result.distortions) == (15, 5)
    assert [int(p.step) for p in projections(resumed)] == [15, 15]
    _close(reference, resumed, 1e-3)
