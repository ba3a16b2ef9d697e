"""Numerical checks of an exported component against the PyTorch module it came from.

Shared by the ONNX, ORT and Core ML exporters. onnxruntime and torch are imported inside the
functions that use them, so importing this module stays light.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """An exported component does not match its reference within tolerance, or a written package
    is not what it should be; the run fails with exit code 1."""


# Identical outputs have an infinite PSNR; report this finite ceiling instead so the number
# survives strict JSON (report.json, manifest.json). fp32 rounding alone lands near 140 dB.
PSNR_CEILING_DB = 200.0


def require_pipeline(pipe) -> None:
    """ValueError unless `pipe` has every part an exporter reads (shapes come from all three models)."""
    needed = {"tokenizer", "scheduler", "text_encoder", "unet", "vae"}
    missing = sorted(a for a in needed if getattr(pipe, a, None) is None)
    if missing:
        raise ValueError(f"pipeline has no {missing}; pass a StableDiffusionPipeline with all of {sorted(needed)}")


def psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """Peak signal-to-noise ratio of `test` against `reference`, in dB.

    The signal range is the reference's peak-to-peak range (max - min), not a fixed 1.0 or
    255: component outputs (text embeddings, predicted noise, decoded images in [-1, 1]) have
    no common scale. PSNR = 20 * log10(range / RMSE). Identical arrays give PSNR_CEILING_DB;
    a NaN anywhere gives NaN. Shapes must match.
    """
    reference = np.asarray(reference, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    if reference.shape != test.shape:
        raise ValueError(f"psnr: shapes differ, reference {reference.shape} vs test {test.shape}")
    if not (np.isfinite(reference).all() and np.isfinite(test).all()):
        return float("nan")
    rmse = math.sqrt(float(np.mean((reference - test) ** 2)))
    if rmse == 0.0:
        return PSNR_CEILING_DB
    signal_range = float(np.ptp(reference)) if reference.size else 0.0
    if signal_range == 0.0:
        # A constant reference has no range to measure against: any error is total failure.
        return 0.0
    return min(20.0 * math.log10(signal_range / rmse), PSNR_CEILING_DB)


def check_psnr_floor(entry: dict, where: str, hint: str) -> None:
    """ParityError when a parity row's `psnr_db` is under its `psnr_floor_db` (NaN fails too); `where`:
    the runtime and reference compared, `hint`: what the user can change."""
    if not entry["psnr_db"] >= entry["psnr_floor_db"]:  # `not >=` so NaN fails too
        raise ParityError(
            f"{entry['component']}: {entry['format']} {where} PSNR {entry['psnr_db']:.1f} dB, below the floor "
            f"{entry['psnr_floor_db']:.0f} dB (max abs error {entry['max_abs_err']:.3g}); {hint}"
        )


def parity_session_options(ort):
    """Session options for a parity check: the graph as exported (no ONNX Runtime rewrites; the
    deliverable's own sessions are measured by the benchmark stage) and no memory arena. ORT's
    layout optimisations keep a second, reordered copy of the weights, and its arena rounds every
    growth up to a power of two: with them the check held twice the weights' size."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


def onnx_parity(
    onnx_path: Path,
    torch_fn: Callable,
    inputs: dict[str, np.ndarray],
) -> tuple[float, float]:
    """Run `onnx_path` in onnxruntime (CPUExecutionProvider) and `torch_fn` on the same inputs.

    `inputs` maps the ONNX input names to arrays; `torch_fn` is called with the same names as
    keyword arguments holding torch tensors (under `torch.no_grad()`) and returns a tensor or a
    tuple of tensors in the ONNX graph's output order. Returns `(max_abs_err, psnr_db)`, the
    worst over all outputs: the largest absolute difference and the lowest PSNR (see `psnr`).
    A NaN or inf anywhere gives `(nan, nan)`, which fails every tolerance check.
    """
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), parity_session_options(ort), providers=["CPUExecutionProvider"])
    onnx_outputs = session.run(None, inputs)
    del session

    with torch.no_grad():
        torch_outputs = torch_fn(**{name: torch.from_numpy(np.asarray(v)) for name, v in inputs.items()})
    if isinstance(torch_outputs, torch.Tensor):
        torch_outputs = (torch_outputs,)
    if len(torch_outputs) != len(onnx_outputs):
        raise ValueError(
            f"{onnx_path}: the ONNX graph has {len(onnx_outputs)} outputs, PyTorch returned {len(torch_outputs)}"
        )

    max_abs_err, psnr_db = 0.0, PSNR_CEILING_DB
    for torch_out, onnx_out in zip(torch_outputs, onnx_outputs, strict=True):
        reference = torch_out.detach().float().numpy()
        if reference.shape != onnx_out.shape:
            raise ValueError(f"{onnx_path}: output shape {onnx_out.shape} differs from PyTorch's {reference.shape}")
        if not (np.isfinite(reference).all() and np.isfinite(onnx_out).all()):
            return float("nan"), float("nan")
        max_abs_err = max(max_abs_err, float(np.max(np.abs(reference - onnx_out), initial=0.0)))
        psnr_db = min(psnr_db, psnr(reference, onnx_out))
    return max_abs_err, psnr_db


@contextmanager
def phase(component: str, name: str, phases_s: dict[str, float]):
    """Log the start and end of one export phase and record its seconds in `phases_s`.

    An SD-1.5 UNet spends minutes in a phase with no output of its own; these lines are the
    progress display. `extra` names the phase for callers that attribute time or memory to it
    (benchmarks/studies/export_sd15.py)."""
    logger.info("%s: %s ...", component, name, extra={"phase": name})
    start = time.perf_counter()
    yield
    phases_s[name] = round(time.perf_counter() - start, 3)
    logger.info("%s: %s done in %.1f s", component, name, phases_s[name], extra={"phase_done": name})
