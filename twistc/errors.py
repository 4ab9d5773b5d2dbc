"""Errors that twistc reports to the user as one line (the CLI prints them without a traceback).

A message that tells the user to set an option marks it `<option:NAME>`; the message reads it as the
Python API spells it (API_SPELLING), and the CLI swaps in its own flag (`cli.FLAGS`)."""
from __future__ import annotations

import re

API_SPELLING = {"resume": "resume=True", "checkpoint": "checkpoint=DIR", "lr": "lr", "atol": "atol", "rtol": "rtol",
                "cache": "plan-latency{cache=PATH}", "provider": "provider='cpu'"}
_OPTION = re.compile(r"<option:(\w+)>")


def spell_options(text: str, spelling: dict[str, str] | None = None) -> str:
    """`text` with each <option:NAME> as `spelling` writes it (default: the Python API's)."""
    names = {**API_SPELLING, **(spelling or {})}
    return _OPTION.sub(lambda m: names.get(m.group(1), m.group(1)), text)


class TwistcError(Exception):
    """Base class: the message is complete and meant for the user; `marked` keeps its option marks."""

    def __init__(self, message: str = ""):
        super().__init__(spell_options(message))
        self.marked = message


class SpecError(TwistcError):
    """A pipeline spec, pass option or plan is malformed."""


class RankError(TwistcError):
    """Requested ranks or ratios that no decomposition can meet."""


class TraceError(TwistcError):
    """The model (or its top level) cannot be traced by torch.fx."""


class PassError(TwistcError):
    """A pass could not be applied, or left an invalid graph behind."""


class NonFiniteError(TwistcError):
    """Training produced a non-finite loss or weight."""


class ExportCheckError(TwistcError):
    """The exported ONNX model does not match PyTorch."""


class ModelFileError(TwistcError):
    """MODEL.py is missing, broken, or does not follow the contract."""


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `signum` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(spell_options(message))
        self.signum = signum
        self.message, self.marked = spell_options(message), message


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors
    built around a library's multi-line ones."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def name_list(names: list[str], most: int = 12) -> str:
    """Names for a message: the first `most`, then "..." when there are more."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
