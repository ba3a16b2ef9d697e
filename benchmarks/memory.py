"""Peak memory of running a model, measured in a fresh child process.

`peak_rss(spec)` starts a fresh Python process (`python -m benchmarks.memory SPEC`; nothing is
inherited from the compress process: no torch, no other models, and unlike multiprocessing's
spawn no re-import of the caller's __main__), runs `spec` there and returns that process's peak resident set
size, so the number belongs to the model and its runtime only. A spec is
`("module:function", {keyword arguments})`; the function may call `mark_runtime()` after its
imports so the runtime's own share (`runtime_rss_bytes`) is reported apart from the model's.

    peak = peak_rss(("benchmarks.memory:ort_component", {"model_path": "...", ...}))

On CUDA, `cuda_peak_bytes` is torch's peak allocated memory around a callable in this process
(the CUDA allocator is per process and reports exactly what the model held).
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Spec = tuple[str, dict[str, Any]]
_runtime_rss = 0  # set in the child by mark_runtime()


def _max_rss_bytes() -> int:
    """This process's peak RSS. On Linux VmHWM of /proc/self/status: ru_maxrss would carry over
    the peak of the forked parent (the kernel keeps it across exec), i.e. the compress process."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS reports bytes, others KiB


def mark_runtime() -> None:
    """Called by a spec function after its imports, before loading the model."""
    global _runtime_rss
    _runtime_rss = _max_rss_bytes()


def _run_child(spec: Spec) -> dict[str, Any]:
    target, kwargs = spec
    module, name = target.split(":")
    result = getattr(importlib.import_module(module), name)(**kwargs)
    return {"peak_rss_bytes": _max_rss_bytes(), "runtime_rss_bytes": _runtime_rss or None, "result": result}


def measure(specs: list[Spec], workers: int = 2, timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """Run every spec in its own fresh process (at most `workers` at a time); per spec
    {"peak_rss_bytes", "runtime_rss_bytes", "result"}, in order. One process per spec because
    a process's peak RSS never goes down."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    results: list[dict[str, Any] | None] = [None] * len(specs)
    pending = list(enumerate(specs))
    while pending:
        batch, pending = pending[: max(1, workers)], pending[max(1, workers) :]
        running = [
            (
                i,
                subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                    cwd=root,
                ),
            )
            for i, spec in batch
        ]
        for i, process in running:
            out, err = process.communicate(timeout=timeout_s)
            if process.returncode != 0:
                raise RuntimeError(f"memory child for {specs[i][0]} exited {process.returncode}: {err.strip()[-2000:]}")
            results[i] = json.loads(out.strip().splitlines()[-1])
    return results  # type: ignore[return-value]


def peak_rss(spec: Spec) -> int:
    """Peak RSS in bytes of a fresh process that runs `spec`."""
    return measure([spec], workers=1)[0]["peak_rss_bytes"]


def cuda_peak_bytes(fn: Callable[[], object], device: str = "cuda") -> int:
    """torch.cuda.max_memory_allocated over one call of `fn` (synchronised)."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# --------------------------------------------------------------------------- spec functions
# Run in the child: import, mark_runtime(), then load and run the model once.


def ort_component(
    model_path: str,
    component: str,
    pipeline_dir: str,
    batch: int,
    providers: list[str],
    threads: int,
    seed: int = 0,
    runtime: str = "onnxruntime",
) -> str:
    """Create a session for one component (an ExecuTorch program's with runtime="executorch") and run it
    once on example inputs; returns the provider."""
    import onnxruntime  # noqa: F401

    from toolchain.runtime.ort import component_inputs, ort_feed, ort_session

    inputs = component_inputs(Path(pipeline_dir), component, batch, seed)
    if runtime == "executorch":
        from toolchain.runtime.executorch import ExecuTorchSession, require_executorch

        require_executorch()  # imports the runtime before the mark
        mark_runtime()
        session = ExecuTorchSession(Path(model_path), component)
        provider = session.get_providers()[0]
    else:
        mark_runtime()
        session, provider = ort_session(Path(model_path), threads, providers)
    session.run(None, ort_feed(session, inputs))
    return provider


def ort_image(
    folder: str,
    files: dict[str, str],
    providers: list[str],
    threads: int,
    steps: int,
    guidance_scale: float,
    runtime: str = "onnxruntime",
) -> str:
    """Generate one image with the whole pipeline in ONNX Runtime (in ExecuTorch's runtime with
    runtime="executorch"); returns the UNet's provider."""
    import diffusers  # noqa: F401
    import onnxruntime  # noqa: F401
    import transformers  # noqa: F401

    from toolchain.runtime.ort import OrtPipeline

    opener = None
    if runtime == "executorch":
        from toolchain.runtime.executorch import executorch_opener

        opener = executorch_opener()
    mark_runtime()
    pipe = OrtPipeline(Path(folder), files, providers, threads, open_session=opener)
    pipe(["a photo"], seed=0, steps=steps, guidance_scale=guidance_scale)
    return pipe.provider


if __name__ == "__main__":  # the child: python -m benchmarks.memory '["module:function", {...}]'
    from benchmarks.memory import _run_child as run_child  # the importable module, whose mark_runtime() specs call

    print(json.dumps(run_child(tuple(json.loads(sys.argv[1])))))
