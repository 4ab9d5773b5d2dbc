"""Training checkpoints that resume exactly.

A checkpoint holds what the `train` stage needs to go on as if it had never stopped: the module's
state_dict (with every DeepTwist projection's step counter), the optimizer, the position (epoch,
batch within it, step; the cosine learning rate is a function of it), the partial TrainResult and
the RNG states of torch, numpy and Python, both now and at the start of the epoch (to replay the
epoch's data order). It also records what it belongs to (the pipeline, the model's structure,
the world size) so that a resume into something else is refused. Files are written atomically and
load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import hashlib
import io
import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from twistc.errors import SpecError, first_line
from twistc.files import WriteError, atomic_write

FORMAT = 1
FILE = "checkpoint.pt"


class CheckpointError(SpecError):
    """A checkpoint that does not belong to this run, or cannot be read."""


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": py_gauss}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"]), p["gauss"]))


def fingerprint(module: nn.Module) -> str:
    """A digest of the module's structure: state_dict names, shapes and dtypes (not values)."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in module.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def identity(pipeline: str, module: nn.Module, world_size: int = 1) -> dict:
    """What a checkpoint belongs to. The folder, how often it is written and how often the run is
    evaluated are not part of it, nor where the train stage runs (its device and memory order), so a
    run can move, e.g. from a GPU that is taken back to a CPU."""
    pipeline = re.sub(r"(checkpoint(_every)?|eval_every)=[^,}]*,?", "", pipeline)
    pipeline = re.sub(r"train\{[^}]*\}", lambda m: re.sub(r"(device|channels_last)=[^,}]*,?", "", m.group(0)),
                      pipeline)
    pipeline = pipeline.replace(",}", "}").replace("{}", "")
    return {"pipeline": pipeline,
            "model": fingerprint(module), "world_size": world_size}


def save(directory: Path, payload: dict, name: str = FILE) -> Path:
    """Write `payload` atomically: a stop, a full disk or a file-size limit during the save keeps the
    previous checkpoint."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create checkpoint folder {directory}: {e.strerror}") from None
    buffer = io.BytesIO()  # serialised first, so that the file system's errors come as OSError
    torch.save({"format": FORMAT, **payload}, buffer)
    return atomic_write(directory / name, lambda f: f.write(buffer.getbuffer()), "checkpoint",
                        "the previous checkpoint is kept")


def load(directory: Path, name: str = FILE) -> dict | None:
    """The checkpoint `name` in `directory`, or None when there is none yet."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path} ({first_line(e)}); it is damaged or not a twistc "
                              "checkpoint: remove it or choose another folder (<option:checkpoint>)") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a twistc checkpoint of format {FORMAT}")
    return payload


def check_belongs(payload: dict, expected: dict, where: Path) -> None:
    """Refuse a checkpoint written by another pipeline, model or world size, saying what differs."""
    for key, what in (("pipeline", "pipeline"), ("model", "model structure"), ("world_size", "world size")):
        if payload["identity"][key] != expected[key]:
            raise CheckpointError(f"checkpoint {where} was written by another {what} "
                                  f"({payload['identity'][key]!r}, this run: {expected[key]!r}); "
                                  "resume with the same settings or choose another folder (<option:checkpoint>)")
