"""ONNX export with a numerical check in onnxruntime.

One export path serves the files twistc writes and the models plan-latency times: torch.onnx's
TorchScript exporter (about a second for a ResNet-50, where the dynamo exporter takes four to six),
falling back to the dynamo exporter for what the TorchScript one cannot take. The file is
self-contained (weights inside, no external-data file that a rename would orphan) and its batch axis
is dynamic. The check runs the exported model in onnxruntime on the example inputs and on a batch of
a different size, and compares with PyTorch in eval mode.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from twistc.errors import ExportCheckError, first_line

log = logging.getLogger(__name__)


ORT_DTYPES = (torch.float32, torch.float16)  # what onnxruntime's CPU Conv kernels take
TOLERANCE = {torch.float16: 1e-2}  # default atol and rtol of the check by the ONNX file's dtype; else 1e-4
# the check passes when every output element meets this, so that it means the same for logits of 10 and of 1e-5
CRITERION = "|onnxruntime - pytorch| <= atol * max|pytorch| + rtol * |pytorch|"
TINY = 1e-6  # a reference output whose largest magnitude is below this proves little: a warning


@dataclass(frozen=True)
class OnnxCheck:
    path: str
    max_abs_diff: float
    atol: float
    rtol: float
    batch_sizes: tuple[int, ...]
    dtype: str = "float32"        # of the ONNX file
    model_dtype: str = "float32"  # of the PyTorch model
    scale: float = 1.0            # the largest |output| of PyTorch, which atol is relative to
    warnings: tuple[str, ...] = ()  # why the check may prove little (a tiny or constant reference output)

    def to_json(self) -> dict:
        return {"path": self.path, "max_abs_diff": self.max_abs_diff, "atol": self.atol, "rtol": self.rtol,
                "batch_sizes": list(self.batch_sizes), "dtype": self.dtype, "model_dtype": self.model_dtype,
                "scale": self.scale, "criterion": CRITERION, "warnings": list(self.warnings)}


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def for_onnxruntime(module: nn.Module, example_inputs: tuple) -> tuple[nn.Module, tuple]:
    """The module and inputs in a dtype onnxruntime runs: as they are in float32 and float16, else a
    float32 copy (onnxruntime has no float64 or bfloat16 Conv on the CPU)."""
    floats = [x.dtype for x in example_inputs if torch.is_tensor(x) and x.is_floating_point()]
    if model_dtype(module) in ORT_DTYPES and all(d in ORT_DTYPES for d in floats):
        return module, example_inputs
    cast = tuple(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in example_inputs)
    return copy.deepcopy(module).float(), cast


@contextlib.contextmanager
def _quiet():
    """torch.onnx and torch.export log notes, warnings and graph dumps; keep the user's terminal clean
    (a failure still raises, and its message reaches the user)."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), _silent_descriptors():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def _silent_descriptors():
    """File descriptors 1 and 2 to /dev/null for the duration: what torch's C++ side prints (the
    TorchScript exporter's whole IR graph when it gives up) bypasses Python's streams."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _dynamic_batch(example_inputs: tuple) -> tuple:
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if torch.is_tensor(x) and x.dim() else None for x in example_inputs)


def save_program(module: nn.Module, example_inputs: tuple, path: str | Path) -> None:
    """torch.export the module (eval mode, dynamic batch) to a .pt2 file: no pickled Python objects."""
    module.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(module, batched(example_inputs, 2),
                                          dynamic_shapes=_dynamic_batch(example_inputs))
    except Exception as e:
        raise _cannot_export("torch.export", module, e) from None
    torch.export.save(program, str(path))


def batched(example_inputs: tuple, batch: int) -> tuple:
    """Each tensor input repeated (or cut) along its first axis to `batch` rows."""
    return tuple(torch.cat([x] * batch)[:batch] if torch.is_tensor(x) and x.dim() else x for x in example_inputs)


def onnx_model(module: nn.Module, example_inputs: tuple, dynamic_batch: bool = True,
               opset: int | None = None) -> bytes:
    """`module` in eval mode as an ONNX model (bytes), its batch axis dynamic unless asked otherwise."""
    inputs = batched(example_inputs, 2) if dynamic_batch else example_inputs
    with _quiet(), torch.no_grad():
        outputs = len(_tensors(module(*example_inputs)))
        names = [f"input{i}" for i in range(len(inputs))], [f"output{i}" for i in range(outputs)]
        axes = {n: {0: "batch"} for n, x in zip(names[0], inputs) if torch.is_tensor(x) and x.dim()}
        axes.update({n: {0: "batch"} for n in names[1]})
        buffer = io.BytesIO()
        try:
            if any(isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.padding == "same" and max(m.dilation) > 1
                   for m in module.modules()):
                raise NotImplementedError("the TorchScript exporter writes padding='same' as auto_pad, "
                                          "which onnxruntime refuses with dilation")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.onnx.export(module, inputs, buffer, dynamo=False, input_names=names[0],
                                  output_names=names[1], dynamic_axes=axes if dynamic_batch else None,
                                  opset_version=opset)
            # a traced branch on a tensor's value would be baked in: leave such models to torch.export
            if not any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
                return buffer.getvalue()
        except Exception:
            pass
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(module, inputs, str(path), dynamo=True, external_data=False, verbose=False,
                                  dynamic_shapes=_dynamic_batch(example_inputs) if dynamic_batch else None,
                                  opset_version=opset)
        except Exception as e:
            raise _cannot_export("torch.onnx", module, e) from None
        return path.read_bytes()


def _cannot_export(exporter: str, module: nn.Module, e: Exception) -> ExportCheckError:
    cause = e.__cause__ or e
    first = first_line(cause)
    return ExportCheckError(f"{exporter} cannot export {type(module).__name__}: {type(cause).__name__}: {first} "
                            "(control flow that depends on tensor values has no static form; express it with "
                            "tensor ops or torch.cond)")


def export_onnx(module: nn.Module, example_inputs: tuple, path: str | Path, atol: float | None = None,
                rtol: float | None = None, opset: int | None = None) -> OnnxCheck:
    """Export `module` to `path` in its own dtype where onnxruntime runs it (else as a float32 copy) and
    check it in onnxruntime, by default within a tolerance that fits that dtype; raise ExportCheckError on
    a mismatch."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    path = Path(path)
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        exported, inputs = for_onnxruntime(module, example_inputs)
        dtype = model_dtype(exported)
        default = TOLERANCE.get(dtype, 1e-4)
        path.write_bytes(onnx_model(exported, inputs, opset=opset))
        onnx.checker.check_model(str(path))
        check = check_onnx(exported, inputs, path, default if atol is None else atol, default if rtol is None else rtol)
        return dataclasses.replace(check, dtype=str(dtype).removeprefix("torch."),
                                   model_dtype=str(model_dtype(module)).removeprefix("torch."))
    finally:
        for m, mode in modes.items():
            m.training = mode


@torch.no_grad()
def check_onnx(module: nn.Module, example_inputs: tuple, path: str | Path, atol: float = 1e-4,
               rtol: float = 1e-4) -> OnnxCheck:
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. no kernel for an op at this dtype
        raise ExportCheckError(f"onnxruntime cannot run {Path(path).name}: {first_line(e)}") from None
    names = [i.name for i in session.get_inputs()]
    worst, sizes, scale, notes = 0.0, [], 0.0, []
    for batch in (example_inputs[0].shape[0], 3):
        inputs = batched(example_inputs, batch) if batch != example_inputs[0].shape[0] else example_inputs
        expected = [t.numpy() for t in _tensors(module(*inputs))]
        got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})
        scale = max([scale] + [float(np.max(np.abs(e))) for e in expected if e.size and np.isfinite(e).all()])
        for e, g in zip(expected, got):
            if e.shape != g.shape:
                raise ExportCheckError(f"{path}: onnxruntime output shape {g.shape} != PyTorch {e.shape}")
            if not (np.isfinite(e).all() and np.isfinite(g).all()):
                which = "PyTorch" if not np.isfinite(e).all() else "onnxruntime"
                raise ExportCheckError(f"{Path(path).name}: non-finite output ({which} gives NaN or inf at batch "
                                       f"{batch}); check the model's weights and inputs for NaN or inf")
            diff = float(np.max(np.abs(e - g))) if e.size else 0.0
            worst = max(worst, diff)
            if not np.allclose(g, e, atol=atol * float(np.max(np.abs(e), initial=0.0)), rtol=rtol):
                raise ExportCheckError(
                    f"{path}: onnxruntime differs from PyTorch by up to {diff:.3g} at batch {batch}, where the "
                    f"outputs reach {float(np.max(np.abs(e), initial=0.0)):.3g} (atol={atol:g} of that, "
                    f"rtol={rtol:g}); raise the tolerance with <option:atol>/<option:rtol> if this is expected")
            if e.size and np.ptp(e) == 0:
                notes.append(f"the model's output is constant ({float(e.flat[0]):.3g} everywhere), so the check "
                             "cannot tell a right export from a wrong one")
        sizes.append(batch)
    if scale < TINY and not notes:
        notes.append(f"the model's outputs are at most {scale:.2g} in magnitude, so the check proves little "
                     "about them")
    for note in dict.fromkeys(notes):
        log.warning("warning: ONNX check of %s: %s", Path(path).name, note)
    return OnnxCheck(str(path), worst, atol, rtol, tuple(sizes), scale=scale, warnings=tuple(dict.fromkeys(notes)))


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _tensors(o)]
