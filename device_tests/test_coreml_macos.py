"""Core ML on a Mac: compile every .mlpackage, check prediction parity against the PyTorch
reference stored beside it (`reference/<Package>.npz`, keys "input:<name>" / "output:<name>",
written by export/coreml.py) and time prediction per compute-unit setting (for the UNet one
prediction is one denoising step at batch 2).

    pytest device_tests -m macos --run-dir runs/device [--compute-units ALL,CPU_AND_NE]
"""

import os
import statistics
import subprocess
import time

import numpy as np
import pytest

pytestmark = pytest.mark.macos
PSNR_FLOOR_DB = 35.0  # apple/ml-stable-diffusion's floor for a converted component
COMPUTE_UNITS = os.environ.get("COREML_COMPUTE_UNITS", "CPU_ONLY,CPU_AND_GPU,CPU_AND_NE,ALL").split(",")
REPEATS = int(os.environ.get("COREML_REPEATS", "10"))


def _psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    peak = float(np.abs(reference).max()) or 1.0
    mse = float(np.mean((reference.astype(np.float64) - actual.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def _packages(run_dir):
    folder = run_dir / "deploy" / "coreml"
    packages = sorted(folder.glob("*.mlpackage"))
    if not packages:
        pytest.skip(f"{folder}: no .mlpackage; run `compress --target coreml --out {run_dir}`")
    return folder, packages


def test_compile_with_coremlcompiler(run_dir, tmp_path):
    _, packages = _packages(run_dir)
    for package in packages:
        result = subprocess.run(
            ["xcrun", "coremlcompiler", "compile", str(package), str(tmp_path)], capture_output=True, text=True
        )
        assert result.returncode == 0, f"{package.name}: coremlcompiler failed:\n{result.stderr}"
        assert (tmp_path / f"{package.stem}.mlmodelc").is_dir()


@pytest.mark.parametrize("compute_units", COMPUTE_UNITS)
def test_prediction_parity_and_latency(run_dir, record, compute_units):
    import coremltools as ct

    folder, packages = _packages(run_dir)
    results = []
    for package in packages:
        reference = np.load(folder / "reference" / f"{package.stem}.npz")
        inputs = {k.split(":", 1)[1]: reference[k] for k in reference.files if k.startswith("input:")}
        outputs = {k.split(":", 1)[1]: reference[k] for k in reference.files if k.startswith("output:")}
        start = time.perf_counter()
        model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit[compute_units])
        load_ms = (time.perf_counter() - start) * 1000.0
        predicted = model.predict(inputs)
        for name, expected in outputs.items():
            got = np.asarray(predicted[name]).reshape(expected.shape)
            psnr = _psnr(expected, got)
            max_abs_err = float(np.abs(expected - got).max())
            results.append(
                {
                    "package": package.stem,
                    "output": name,
                    "compute_units": compute_units,
                    "psnr_db": psnr,
                    "max_abs_err": max_abs_err,
                }
            )
            assert psnr >= PSNR_FLOOR_DB, (
                f"{package.stem}.{name} on {compute_units}: PSNR {psnr:.1f} dB < {PSNR_FLOOR_DB} dB "
                f"(max abs err {max_abs_err:.3g}) against the PyTorch reference"
            )
        model.predict(inputs)  # warm-up: the first prediction specialises for the device
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            model.predict(inputs)
            times.append((time.perf_counter() - start) * 1000.0)
        results.append(
            {
                "package": package.stem,
                "compute_units": compute_units,
                "load_ms": load_ms,
                "median_ms": statistics.median(times),
                "repeats": REPEATS,
                "per": "denoising step (batch 2)" if package.stem == "Unet" else "call",
            }
        )
    record(f"coreml-{compute_units}", results)
