"""DDP with gloo: 2 processes over shards of the batches end where 1 process over the same global batches ends."""
import gc
import json
import os
import socket
import subprocess
import sys
import time
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models_for_tests import TINY_MODEL_PY, tiny_deeptwist_cnn
from twistc.distributed import leave
from twistc.train import projections, train

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available here")


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(6)]


def _held_out():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(5)]


def _train(gm, data, accumulate=1):  # evaluated on the held-out batches after each epoch, each rank on its share
    return train(gm, lambda: data, 2, lr=0.05, progress=False, accumulate=accumulate, eval_data=_held_out,
                 eval_every=1)


def _own_shard(batches, rank):
    """This rank's batches from a generator without a length, as a train_data(rank, world_size) may give."""
    yield from batches[rank::2]


def _worker(rank: int, world: int, init: str, out: str, accumulate: int, own_shard: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        gm = tiny_deeptwist_cnn()
        if own_shard:  # the last step's end shows only when the generator runs out
            result = train(gm, lambda: _own_shard(_batches(), rank), 2, lr=0.05, progress=False,
                           accumulate=accumulate, shard=False, eval_data=_held_out, eval_every=1)
        else:
            result = _train(gm, _batches(), accumulate)  # each rank takes every 2nd batch
        torch.save({"state": gm.state_dict(), "steps": result.steps, "evaluations": result.evaluations,
                    "losses": result.losses}, f"{out}.{rank}")
    finally:
        leave()


# with accumulate=2 each rank's 3 batches make steps of 2 and 1: global steps over batches 0-3 and 4-5
@pytest.mark.parametrize("accumulate, steps, own_shard", [(1, [(0, 1), (2, 3), (4, 5)], False),
                                                         (2, [(0, 1, 2, 3), (4, 5)], False),
                                                         (2, [(0, 1, 2, 3), (4, 5)], True)])
@pytest.mark.slow
def test_two_gloo_processes_equal_one_over_the_global_batches(tmp_path, accumulate, steps, own_shard):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out"), accumulate, own_shard), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    batches = _batches()
    global_batches = [(torch.cat([batches[i][0] for i in step]), torch.cat([batches[i][1] for i in step]))
                      for step in steps]
    single = tiny_deeptwist_cnn()
    result = train(single, lambda: (b for b in global_batches) if own_shard else global_batches, 2, lr=0.05,
                   progress=False, eval_data=_held_out, eval_every=1)  # without a length, as the ranks' own shards
    assert ranks[0]["steps"] == ranks[1]["steps"] == result.steps == 2 * len(steps)
    # the ranks split the 5 held-out batches 3 / 2 and sum their counts: the accuracy of all 25 images
    if accumulate == 1:  # the epoch's loss is the mean over all ranks' batches, as one process over them sees it
        assert ranks[0]["losses"] == ranks[1]["losses"] == pytest.approx(result.losses, abs=1e-5)
    accuracies = lambda evaluations: [(e["epoch"], e["accuracy"], e["low_rank_accuracy"]) for e in evaluations]
    assert accuracies(ranks[0]["evaluations"]) == accuracies(ranks[1]["evaluations"]) == accuracies(result.evaluations)
    assert len(result.evaluations) == 2
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], value, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(ranks[1]["state"][name], ranks[0]["state"][name], atol=0, rtol=0, msg=name)
    assert [int(p.step) for p in projections(single)] == [int(ranks[0]["state"][k]) for k in ranks[0]["state"]
                                                           if k.endswith("projection.step")] == [result.steps]  # the stem stays dense


TINY = TINY_MODEL_PY + '''
def train_data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(6)]
'''


def _torchrun_compile(tmp_path, *torchrun_args: str) -> list[str]:
    """torchrun with these arguments, compiling TINY into tmp_path/out."""
    model = tmp_path / "model.py"
    model.write_text(TINY)
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "twistc", "compile", str(model),
            "--pass", "deeptwist-tucker", "--epochs", "1", "--period", "2", "--threads", "1",
            "-o", str(tmp_path / "out"), "--quiet"]


@pytest.mark.slow
def test_torchrun_compiles_with_two_ranks(tmp_path):
    out = tmp_path / "out"
    run = subprocess.run(_torchrun_compile(tmp_path, "--standalone", "--nproc-per-node", "2"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 3 and report["training"]["distortions"] == 1  # 6 batches over 2 ranks
    assert run.stdout.count("wrote ") == 1  # rank 0 alone writes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_through_torchruns_rendezvous_and_only_global_rank_0_writes(tmp_path):
    """Two torchrun agents, one process each, as on two machines (here both on this one, sharing its disk)."""
    command = _torchrun_compile(tmp_path, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "twistc-test")
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300) for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # a no-op for a node that has ended
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["training"]["steps"] == 3  # 6 batches over 2 ranks on 2 nodes
    assert sum(stdout.count("wrote ") for stdout, _ in outputs) == 1


def test_leaving_collects_what_holds_the_group_and_destroys_it(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        gc.disable()  # the cycle below stays until someone collects it
        wrapper = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        wrapper.cycle = [wrapper]
        held = weakref.ref(wrapper)
        del wrapper
        assert held() is not None and dist.is_initialized()
        leave()
        assert held() is None and not dist.is_initialized()
        leave()  # and once out, leaving again does nothing
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_each_rank_takes_its_own_gpu_and_nccl_only_where_there_are_gpus(monkeypatch):
    from twistc import distributed
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.local_device("cuda") == "cuda:3"
    assert distributed.local_device("cuda:1") == "cuda:1" and distributed.local_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert distributed.backend() == "cpu:gloo,cuda:nccl"


UNEVEN = TINY_MODEL_PY + '''
import time

def train_data(rank, world_size, stall=0.0):
    """Rank 0 has 4 batches, rank 1 has 2, from a generator without a length; `stall`: rank 1 hangs first."""
    if rank == 1 and stall:
        time.sleep(stall)
    g = torch.Generator().manual_seed(rank)
    for _ in range(4 if rank == 0 else 2):
        yield torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)
'''


def _torchrun_uneven(tmp_path, *extra: str) -> list[str]:
    model = tmp_path / "model.py"
    model.write_text(UNEVEN)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "twistc",
            "compile", str(model), "--pass", "deeptwist-tucker", "--epochs", "1", "--period", "2", "--threads", "1",
            "-o", str(tmp_path / "out"), "--quiet", *extra]


@pytest.mark.slow
def test_ranks_with_unequal_batch_counts_train_the_common_length_instead_of_hanging(tmp_path):
    run = subprocess.run(_torchrun_uneven(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["training"]["steps"] == 2
    assert "another rank's train_data() ran out first" in run.stderr


@pytest.mark.slow
def test_a_rank_that_stops_answering_ends_the_run_with_an_error_within_the_timeout(tmp_path):
    start = time.perf_counter()
    env = {**os.environ, "TWISTC_COLLECTIVE_TIMEOUT": "5"}
    run = subprocess.run(_torchrun_uneven(tmp_path, "--set", "stall=120"), capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode != 0 and time.perf_counter() - start < 100, run.stderr[-3000:]
    assert "twistc: error: rank 0: the other ranks did not answer within 5 s" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "out").exists()
