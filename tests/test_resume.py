"""A run killed in the middle of a stage resumes and ends with the same outputs."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from toolchain import artifact as art

from .conftest import run


def test_killed_run_resumes_to_identical_outputs(finished_run, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "toolchain.cli",
        "--target",
        "onnx",
        "--model",
        str(tiny_sd_dir),
        "--recipe",
        "tiny",
        "--out",
        str(out),
        "--no-progress",
        "-q",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    # kill once the export stage has started writing (prune is sealed by then)
    while not (out / "02-export.partial" / "text_encoder").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "01-prune" / art.MANIFEST).is_file()
    assert not (out / "02-export").exists() and (out / "02-export.partial").exists()
    prune_sealed = (out / "01-prune" / art.MANIFEST).stat().st_mtime_ns

    assert run(tiny_sd_dir, out) == 0  # the lock died with the process; the re-run resumes
    assert (out / "01-prune" / art.MANIFEST).stat().st_mtime_ns == prune_sealed, "sealed prune was redone"
    assert not list(out.glob("*.partial"))
    reference = finished_run[0]
    for stage in ("01-prune", "02-export"):
        assert art.load(out / stage).fingerprint == art.load(reference / stage).fingerprint
    assert (out / "01-prune/unet/diffusion_pytorch_model.safetensors").read_bytes() == (
        reference / "01-prune/unet/diffusion_pytorch_model.safetensors"
    ).read_bytes()
    for component in ("text_encoder", "unet", "vae_decoder"):
        ours = _initializers(out / "deploy/onnx" / component / "model.onnx")
        theirs = _initializers(reference / "deploy/onnx" / component / "model.onnx")
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours), component


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
