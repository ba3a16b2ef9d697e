"""device_tests/gpu_check.py, the CUDA path check, run here as its CPU smoke form (`--device cpu --tiny`).

The same script runs on a GPU with `--device cuda`; here it must run end to end under `accelerate
launch`, write figures that mean something, and refuse CUDA on a machine without a GPU.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "device_tests" / "gpu_check.py"


def _script(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory) -> tuple[dict, Path]:
    """One `--device cpu --tiny` run: (its JSON, its output folder)."""
    out = tmp_path_factory.mktemp("gpu-check")
    result = _script("--device", "cpu", "--tiny", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "gpu-check.json").read_text()), out


# the smoke run takes 80 s on 2 cores: its tests run with -m slow; the refusal test stays in the default run
SMOKE = pytest.mark.slow


def _figures(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["figures"]}


def _value(result: dict, name: str) -> float:
    value = _figures(result)[name]["value"]
    assert isinstance(value, int | float) and math.isfinite(value), f"{name} = {value!r}"
    return value


@SMOKE
def test_every_part_runs_under_accelerate_and_every_check_holds(cpu_check):
    result, _ = cpu_check
    assert result["ok"] and result["device"] == "cpu" and result["mode"] == "tiny"
    assert {name: part["ok"] for name, part in result["parts"].items()} == dict.fromkeys(
        ("digits", "sfd", "unet_prune", "unet_latency", "unet_train"), True
    ), result["parts"]
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    assert result["launcher"]["ACCELERATE_MIXED_PRECISION"] == "bf16"  # set by `accelerate launch`
    for row in result["figures"]:
        assert set(row) == {"name", "value", "unit", "what", "device"} and row["what"] and row["device"], row


@SMOKE
def test_digits_loss_is_finite_and_falls_and_pruning_removes_params(cpu_check):
    result, _ = cpu_check
    assert _value(result, "digits.finetune.loss_last") < _value(result, "digits.finetune.loss_first")
    assert _value(result, "digits.finetune.upper_steps") >= 1  # bilevel: unlearning steps were taken
    assert _value(result, "digits.finetune.steps_per_s") > 0
    assert _value(result, "digits.prune.unet_params_after") < _value(result, "digits.prune.unet_params_before")
    assert _value(result, "unet.prune.params_after") < _value(result, "unet.prune.params_before")
    assert math.isfinite(_value(result, "sfd.finetune.loss_last"))


@SMOKE
def test_export_of_the_trained_model_matches_pytorch(cpu_check):
    result, _ = cpu_check
    assert _value(result, "digits.export.unet.max_abs_err") <= 1e-4
    assert _value(result, "digits.export.unet.psnr_db") >= 35


@SMOKE
def test_latency_speed_and_memory_figures_are_positive_and_say_where(cpu_check):
    result, _ = cpu_check
    figures = _figures(result)
    latency = [name for name in figures if name.endswith("median_ms")]
    assert {f"unet.latency.{v}.{d}.median_ms" for v in ("unpruned", "pruned") for d in ("fp32", "fp16")} <= set(latency)
    assert "digits.benchmark.torch.unet.finetune.median_ms" in latency  # the benchmark stage, cuda profile
    assert "digits.latency.finetune.fp16.median_ms" in latency  # its fp16 twin
    for name in latency:
        assert _value(result, name) > 0, name
    for batch in (4, 8):
        assert _value(result, f"unet.bilevel.batch{batch}.steps_per_s") > 0
        assert _value(result, f"unet.bilevel.batch{batch}.peak_memory_bytes") > 0
    assert figures["unet.latency.pruned.fp16.median_ms"]["device"].startswith("cpu")
    assert any("wants CUDA but torch sees no GPU" in w for w in result["warnings"])  # said, not hidden


@SMOKE
def test_markdown_is_rendered_from_the_json(cpu_check, monkeypatch):
    result, out = cpu_check
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up there
    spec.loader.exec_module(gpu_check)
    table = (out / "gpu-check.md").read_text()
    assert table == gpu_check.render_markdown(result)
    assert all(f"| {row['name']} |" in table for row in result["figures"])


def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: nothing to refuse")
    result = _script("--device", "cuda", "--out", str(tmp_path / "out"), timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "no CUDA GPU" in result.stderr and "--device cpu" in result.stderr
    assert not (tmp_path / "out").exists(), "a refusal leaves nothing behind"
