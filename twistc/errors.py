"""Errors that twistc reports to the user as one line (the CLI prints them without a traceback)."""


class TwistcError(Exception):
    """Base class: the message is complete and meant for the user."""


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
        super().__init__(message)
        self.signum = signum
        self.message = message


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors
    built around a library's multi-line ones."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def name_list(names: list[str], most: int = 12) -> str:
    """Names for a message: the first `most`, then "..." when there are more."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
