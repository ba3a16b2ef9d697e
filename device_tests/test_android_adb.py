"""ONNX Runtime on an Android phone over adb: push the ORT-format model folder
(`deploy/ort`, from `compress --target ort`) and run each component there.

- parity: onnxruntime's `onnx_test_runner` on a test case per component (the model plus
  `test_data_set_0/input_*.pb` / `output_*.pb` computed on this host with ONNX Runtime CPU);
- latency: `onnxruntime_perf_test` on the same model (XNNPACK EP, then CPU).
Neither binary ships with the phone: build them for Android
(`./build.sh --android --android_abi arm64-v8a --build_shared_lib --use_xnnpack`) and point
ANDROID_ORT_BIN_DIR at the folder holding them; a test whose binary is missing skips.

    pytest device_tests -m android --run-dir runs/device
"""

import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.android
REMOTE = "/data/local/tmp/diffusion-compress"
BIN_DIR = os.environ.get("ANDROID_ORT_BIN_DIR")
THREADS = os.environ.get("ANDROID_ORT_THREADS", "4")  # the Pixel 8 profile's big cores


def adb(*args: str, timeout: int = 600) -> str:
    result = subprocess.run(["adb", *args], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"adb {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _binary(name: str) -> str:
    if not BIN_DIR or not (Path(BIN_DIR) / name).is_file():
        pytest.skip(f"{name} for Android not found; set ANDROID_ORT_BIN_DIR to the folder of an Android ORT build")
    adb("push", str(Path(BIN_DIR) / name), f"{REMOTE}/bin/{name}")
    adb("shell", "chmod", "+x", f"{REMOTE}/bin/{name}")
    return f"{REMOTE}/bin/{name}"


@pytest.fixture(scope="module")
def pushed(run_dir, tmp_path_factory):
    """Push deploy/ort plus one onnx_test_runner test case per component; returns the component names."""
    import onnxruntime as ort
    from onnx import numpy_helper

    from toolchain.runtime.ort import component_inputs, ort_feed

    folder = run_dir / "deploy" / "ort"
    models = sorted(folder.glob("*/model.ort"))
    if not models:
        pytest.skip(f"{folder}: no <component>/model.ort; run `compress --target ort --out {run_dir}`")
    cases = tmp_path_factory.mktemp("cases")
    for model in models:
        component = model.parent.name
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        feed = ort_feed(session, component_inputs(folder, component, 2, seed=0))
        outputs = session.run(None, feed)
        case = cases / component / "test_data_set_0"
        case.mkdir(parents=True)
        (cases / component / "model.ort").write_bytes(model.read_bytes())
        for i, (name, value) in enumerate(feed.items()):
            (case / f"input_{i}.pb").write_bytes(numpy_helper.from_array(np.asarray(value), name).SerializeToString())
        for i, (spec, value) in enumerate(zip(session.get_outputs(), outputs, strict=True)):
            (case / f"output_{i}.pb").write_bytes(numpy_helper.from_array(value, spec.name).SerializeToString())
    adb("shell", "rm", "-rf", REMOTE)
    adb("shell", "mkdir", "-p", f"{REMOTE}/bin")
    adb("push", str(folder), f"{REMOTE}/ort")
    adb("push", str(cases), f"{REMOTE}/cases")
    return [m.parent.name for m in models]


def test_parity_with_onnx_test_runner(pushed):
    runner = _binary("onnx_test_runner")
    out = adb("shell", f"cd {REMOTE} && {runner} -e cpu -j 1 -a 1e-3 -r 1e-3 cases")
    assert re.search(r"Failed Test Cases:\s*0\b", out) or "failed: 0" in out.lower(), out


@pytest.mark.parametrize("provider", ["xnnpack", "cpu"])
def test_latency_with_perf_test(pushed, record, provider):
    perf = _binary("onnxruntime_perf_test")
    results = []
    for component in pushed:
        out = adb(
            "shell",
            f"{perf} -e {provider} -x {THREADS} -r 20 -I {REMOTE}/ort/{component}/model.ort",
        )
        match = re.search(r"Average inference time cost:\s*([\d.]+)\s*ms", out)
        assert match, f"{component}: no latency in onnxruntime_perf_test output:\n{out}"
        results.append({"component": component, "provider": provider, "threads": THREADS, "mean_ms": float(match[1])})
    record(f"android-{provider}", results)
