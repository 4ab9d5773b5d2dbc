"""MODEL.py: the user's model as a file twistc can load.

Contract: `model()` returns an nn.Module (with its weights loaded), `example_inputs()` a tuple of
tensors; `train_data()` and `eval_data()`, when present, return iterables of (input, target)
batches (`train_data()` is called once per epoch). Options from `--set key=value` reach every one
of these functions that has a parameter of that name, converted to the type of its default.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from twistc.distributed import world
from twistc.errors import ModelFileError

FUNCTIONS = ("model", "example_inputs", "train_data", "eval_data")


def _where(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve() == path]
    return f" ({path.name}:{frames[-1].lineno})" if frames else ""


def _convert(raw: str, default: Any, key: str):
    if isinstance(default, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ModelFileError(f"option {key}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1", "yes")
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            raise ModelFileError(f"option {key}={raw!r}: expected {type(default).__name__}") from None
    return raw


@dataclass
class ModelFile:
    path: Path
    module: ModuleType
    options: dict[str, str]

    def has(self, name: str) -> bool:
        return callable(getattr(self.module, name, None))

    def call(self, name: str):
        fn = getattr(self.module, name, None)
        if not callable(fn):
            raise ModelFileError(f"{self.path} defines no {name}() function")
        params = inspect.signature(fn).parameters
        kwargs = {k: _convert(v, params[k].default, k) for k, v in self.options.items() if k in params}
        rank, size = world()
        kwargs.update({k: v for k, v in (("rank", rank), ("world_size", size)) if k in params and k not in kwargs})
        try:
            return fn(**kwargs)
        except ModelFileError:
            raise
        except SystemExit as e:
            raise ModelFileError(f"{name}() in {self.path.name} called sys.exit({e.code!r}){_where(e, self.path)}; "
                                 "raise an exception instead") from None
        except Exception as e:
            raise ModelFileError(f"{name}() in {self.path.name} raised {type(e).__name__}: {e}{_where(e, self.path)}") from None

    def model(self) -> nn.Module:
        m = self.call("model")
        if not isinstance(m, nn.Module):
            raise ModelFileError(f"model() in {self.path.name} returned {type(m).__name__}, not an nn.Module")
        return m

    def example_inputs(self) -> tuple:
        x = self.call("example_inputs")
        inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        for i, t in enumerate(inputs):
            if not torch.is_tensor(t):
                raise ModelFileError(f"example_inputs() in {self.path.name} gives a {type(t).__name__} as input {i}; "
                                     "return a tuple of torch tensors (torch.from_numpy converts arrays)")
            if t.dim() and t.shape[0] == 0:
                raise ModelFileError(f"example_inputs() in {self.path.name} gives input {i} of shape "
                                     f"{tuple(t.shape)}, a batch of 0; give at least one sample")
        return inputs

    def takes(self, name: str, parameter: str) -> bool:
        """Whether function `name` has a parameter called `parameter`."""
        return self.has(name) and parameter in inspect.signature(getattr(self.module, name)).parameters

    def data(self, name: str):
        """`train_data` / `eval_data` as a zero-argument callable, or None when MODEL.py has none."""
        return (lambda: self.call(name)) if self.has(name) else None


def load_model_file(path: str | Path, options: dict[str, str] | None = None) -> ModelFile:
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"twistc_model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # let MODEL.py import its neighbours
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:
        raise ModelFileError(f"importing {path.name} called sys.exit({e.code!r}){_where(e, path)}; keep "
                             "command-line code under `if __name__ == '__main__':`") from None
    except SyntaxError as e:
        raise ModelFileError(f"syntax error in {path.name} line {e.lineno}: {e.msg}") from None
    except Exception as e:
        raise ModelFileError(f"importing {path.name} raised {type(e).__name__}: {e}{_where(e, path)}") from None
    finally:
        sys.path.remove(str(path.parent))
    mf = ModelFile(path, module, dict(options or {}))
    if not mf.has("model") or not mf.has("example_inputs"):
        missing = [f"{n}()" for n in ("model", "example_inputs") if not mf.has(n)]
        raise ModelFileError(f"{path.name} must define {' and '.join(missing)}")
    accepted = {p for n in FUNCTIONS if mf.has(n) for p in inspect.signature(getattr(module, n)).parameters}
    unknown = sorted(set(mf.options) - accepted)
    if unknown:
        raise ModelFileError(f"no function in {path.name} takes option(s) {', '.join(unknown)} "
                             f"(accepted: {', '.join(sorted(accepted)) or 'none'})")
    return mf
