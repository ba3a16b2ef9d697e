"""Device tests: Core ML on a Mac, ONNX Runtime on an Android phone over adb.

Not collected by a plain `pytest` (pyproject's testpaths = ["tests"]); run them explicitly:

    compress --target coreml --out runs/device        # or --target ort for Android
    pytest device_tests --run-dir runs/device

Each test skips, with the reason, when its hardware or tool is missing. Results (parity and
latency) are also written to <run-dir>/device-results/<test>.json for the record.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RUN_DIR_ENV = "DEVICE_TESTS_RUN_DIR"


def pytest_addoption(parser):
    parser.addoption("--run-dir", default=None, help=f"a finished compress run folder (or ${RUN_DIR_ENV})")


def pytest_configure(config):
    config.addinivalue_line("markers", "android: needs adb and a connected Android device; skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    """Skip by capability: `macos` off macOS or without Xcode's command line tools, `android`
    without adb or without a device in `adb devices`."""
    reasons = {}
    if sys.platform != "darwin":
        reasons["macos"] = "needs macOS (Core ML prediction and xcrun coremlcompiler)"
    elif shutil.which("xcrun") is None:
        reasons["macos"] = "needs Xcode command line tools (xcrun)"
    if shutil.which("adb") is None:
        reasons["android"] = "needs adb on PATH and a device with USB debugging"
    elif not _adb_devices():
        reasons["android"] = "adb sees no device (`adb devices` lists none in state 'device')"
    for item in items:
        for marker, reason in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def _adb_devices() -> list[str]:
    try:
        out = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.splitlines()[1:] if line.strip().endswith("\tdevice")]


@pytest.fixture(scope="session")
def run_dir(request) -> Path:
    value = request.config.getoption("--run-dir") or os.environ.get(RUN_DIR_ENV)
    if not value:
        pytest.skip(f"pass --run-dir (or set ${RUN_DIR_ENV}) to a finished `compress` run folder")
    path = Path(value)
    if not (path / "deploy").is_dir():
        pytest.fail(f"{path}: no deploy/ folder; run `compress --target coreml|ort --out {path}` to the end first")
    return path


@pytest.fixture(scope="session")
def record(run_dir):
    """record(name, data): write device results to <run-dir>/device-results/<name>.json."""

    def write(name: str, data) -> Path:
        folder = run_dir / "device-results"
        folder.mkdir(exist_ok=True)
        path = folder / f"{name}.json"
        path.write_text(json.dumps(data, indent=2) + "\n")
        return path

    return write
