"""Writing a compile's results into OUTDIR without ever removing or overwriting a file twistc did not write.

Everything is first written into a temporary folder beside OUTDIR. At the end each file is linked
into OUTDIR under its name: a link never replaces an existing file, so a file that appeared there
in the meantime is never clobbered. A file is only replaced when OUTDIR carries twistc's marker
(`.twistc-output.json`, with a format version and the files twistc wrote) listing it, and only
with `--force`. Files twistc did not write are never removed; if OUTDIR holds any, `--force`
included, twistc refuses. The temporary folder is removed on success, error and signal alike.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from twistc.errors import SpecError

MARKER = ".twistc-output.json"
MARKER_FORMAT = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _marked_files(out: Path) -> set[str] | None:
    """The files twistc wrote into `out` by its marker; None when it carries no valid marker."""
    try:
        marker = json.loads((out / MARKER).read_text())
        if marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("files"), list):
            return None
        return {str(f) for f in marker["files"]} | {MARKER}
    except (OSError, ValueError, AttributeError):
        return None


def check_output(out: Path, protected: Path, force: bool, names: tuple[str, ...] = ()) -> None:
    """Refuse an output path that is a file, holds `protected` (the input), lies under a file or holds
    files twistc did not write. `names`: the files the run will write (checked for clashes)."""
    out = Path(os.path.abspath(out))
    if out.resolve() in (protected, *protected.parents):
        raise SpecError(f"output {out} would overwrite the input {protected}; choose another -o")
    if out.is_symlink() and not out.exists():
        raise SpecError(f"output {out} is a dangling symbolic link; remove it or choose another -o")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise SpecError(f"output {out} lies under {parent}, which is a file; choose another -o")
    if out.exists() and not out.is_dir():
        raise SpecError(f"output {out} is a file; choose a directory with -o")
    if not out.is_dir():
        return
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    ours = _marked_files(out)
    if ours is None:
        raise SpecError(f"output directory {out} is not empty and twistc did not write it (no {MARKER}); "
                        "choose another -o" + ("" if force else " (--force replaces only earlier twistc outputs)"))
    foreign = sorted(present - ours)
    if foreign:
        raise SpecError(f"output directory {out} holds files twistc did not write ({', '.join(foreign[:5])}); "
                        "move them away or choose another -o")
    if not force and present & (set(names) | {MARKER}):
        raise SpecError(f"output directory {out} holds an earlier twistc output; pass --force to replace it "
                        "or choose another -o")


class OutputDir:
    """`with OutputDir(out, protected, force) as tmp:` write files into `tmp`, then `commit()`."""

    def __init__(self, out: Path, protected: Path, force: bool):
        self.out = Path(os.path.abspath(out))
        self.protected = protected
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.twistc-tmp.", dir=self.out.parent))
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        """Move every file of the temporary folder into OUTDIR (checked again now), marker last."""
        names = tuple(sorted(p.name for p in self.tmp.iterdir()))
        check_output(self.out, self.protected, self.force, names)
        (self.tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "tool": "twistc",
                                                   "files": list(names)}, indent=1) + "\n")
        try:
            os.mkdir(self.out, 0o777 & ~_umask())
        except FileExistsError:
            pass
        ours = _marked_files(self.out) or set()
        linked: list[Path] = []
        try:
            for name in names + (MARKER,):
                src, dst = self.tmp / name, self.out / name
                try:
                    os.link(src, dst)  # fails if a file of that name exists: never replaces
                    linked.append(dst)
                except FileExistsError:
                    if not (self.force and name in ours):
                        raise SpecError(f"{dst} appeared while twistc was running; it was left as it is and "
                                        "nothing was written; choose another -o") from None
                    os.replace(src, dst)
        except BaseException:
            for path in linked:  # roll back what this run added; replaced files were twistc's own
                path.unlink(missing_ok=True)
            raise
        for stale in ours - set(names) - {MARKER}:  # an earlier run's file this run does not write
            (self.out / stale).unlink(missing_ok=True)
        return self.out
