"""Shared pieces of the experiment scripts: resumable run store, paired bootstrap, run metadata.

Each run is one JSON file under <out>/runs/; a rerun skips runs whose file exists, so a grid can be
spread over several sessions and each finished run committed on its own.
"""
from __future__ import annotations

import base64
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from twistc.report import cpu_model, versions

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class RunStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "runs").mkdir(parents=True, exist_ok=True)

    def path(self, run_id: str) -> Path:
        return self.root / "runs" / f"{run_id}.json"

    def done(self, run_id: str) -> bool:
        return self.path(run_id).is_file()

    def save(self, run_id: str, result: dict) -> None:
        """Atomic write: a run file exists only when the run finished."""
        fd, tmp = tempfile.mkstemp(dir=self.root / "runs", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path(run_id))

    def load_all(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.root / "runs").glob("*.json"))]


def pack_bools(correct: np.ndarray) -> str:
    return base64.b64encode(np.packbits(correct.astype(bool)).tobytes()).decode()


def unpack_bools(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b (per-sample correctness) and its 95% percentile interval, resampling test images."""
    rng = np.random.default_rng(seed)
    diff = a.astype(np.float64) - b.astype(np.float64)
    idx = rng.integers(0, len(diff), size=(reps, len(diff)))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@torch.no_grad()
def correctness(module: torch.nn.Module, batches) -> np.ndarray:
    module.eval()
    out = [(module(x).argmax(1) == y).numpy() for x, y in batches]
    return np.concatenate(out)


def metadata() -> dict:
    return {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
            "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "platform": platform.platform()},
            "versions": versions()}


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])
