"""The latency cache: measured medians that later compiles reuse, and only those worth reusing.

Each entry records its median (ms), how steady its samples were (`spread` and `drift` of the paired
ratios, see twistc.timing) and the machine's load when it was measured. An entry measured on a busy
machine is not trusted: the next compile measures it again. (A layer of a few microseconds spreads
more than a whole model even on a quiet machine, so spread and drift are kept as a record only.) Compiles sharing one cache
lose nothing: a save takes a lock, merges what is on disk with what this run measured, and writes
atomically (twistc.files). A path that holds anything but a twistc cache is refused, never written.
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

from twistc.errors import SpecError
from twistc.files import atomic_write, check_writable
from twistc.timing import Sampling

log = logging.getLogger(__name__)

FORMAT = 2
KIND = "twistc latency cache"


def default_cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "twistc" / "latency.json"


def _read(path: Path) -> dict[str, dict]:
    """The entries of the cache at `path` ({} when there is no file, or an empty one); a file that is
    not a twistc latency cache is a SpecError naming it."""
    if not path.is_file():
        return {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"latency cache {path} cannot be read ({getattr(e, 'strerror', None) or e}); "
                        "choose another (<option:cache>)") from None
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not (isinstance(data, dict) and data.get("format") in (1, FORMAT) and isinstance(data.get("entries"), dict)):
        raise SpecError(f"{path} is not a twistc latency cache; twistc will not write over it: choose another "
                        "path (<option:cache>)")
    entries = {}
    for key, value in data["entries"].items():
        entry = value if isinstance(value, dict) else {"ms": value}  # format 1: medians without a record
        try:
            ms = float(entry.get("ms"))
        except (TypeError, ValueError):
            continue
        if math.isfinite(ms) and ms > 0:
            entries[str(key)] = {**entry, "ms": ms}
    return entries


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path`'s cache while saving (a lock file beside it)."""
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class LatencyCache:
    """Medians (ms) keyed by runtime, layer shape and candidate, each with how it was measured."""

    def __init__(self, path: str | Path | None = None):
        self.path = check_writable(path or default_cache_path(), "latency cache", folder=False)
        self.entries = _read(self.path)
        self.measured: dict[str, dict] = {}  # what this run measured, merged into the file on save
        self.distrusted = 0  # entries measured again because their record was not trustworthy

    @staticmethod
    def check(path: str | Path | None, flag: str = "latency cache") -> None:
        """Refuse, before any work, a cache path that cannot be written or holds something else; `flag`
        names the option that gave the path in the message."""
        _read(check_writable(path or default_cache_path(), flag, folder=False))

    def get(self, key: str) -> float | None:
        """The cached median, or None when there is none or it was measured on a busy machine."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if key not in self.measured and Sampling.from_json(entry).busy:
            self.distrusted += 1
            return None
        return entry["ms"]

    def put(self, key: str, ms: float, sampling: Sampling | None = None) -> None:
        entry = {"ms": float(ms), **(sampling or Sampling.now()).to_json()}
        self.entries[key] = self.measured[key] = entry

    def save(self) -> None:
        """Merge this run's measurements into the file as it is now (another compile may have saved since)."""
        if not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            entries = {**_read(self.path), **self.measured}
            text = json.dumps({"format": FORMAT, "kind": KIND, "unit": "ms (median)", "entries": entries},
                              indent=0, sort_keys=True)
            atomic_write(self.path, lambda f: f.write(text.encode()), "latency cache",
                         "the cache keeps its earlier entries")
        self.entries = entries
        if self.distrusted:
            log.warning("latency cache %s: %d entries measured on a busy machine (or recorded without their load) "
                        "were measured again", self.path, self.distrusted)
