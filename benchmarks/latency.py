"""Latency: warm-up, then timed repeats; median and p90 in milliseconds.

Inputs are built from the component's own config so the same numbers can be taken for any
Stable Diffusion pipeline, pruned or not, in PyTorch and in ONNX Runtime.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from toolchain.runtime.ort import ort_feed


def machine_info() -> dict[str, object]:
    """What latency depends on, so a gate compares latencies only between like machines."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system()}


# The machine-speed probe: a fixed CPU workload, independent of any model this project makes.
PROBE_SIZE, PROBE_CHAIN = 384, 20


def speed_probe(repeats: int = 10) -> float:
    """Median ms of a fixed CPU workload (20 chained 384x384 float32 matmul + tanh, torch, at the
    current thread count): how fast this machine runs right now.

    CPU model and core count do not pin a VM's speed: on the 2-core CI machine the same digits UNet
    forward took 37-72 ms within minutes, and 28 ms on the day the baseline was recorded. The gate
    scales a baseline's CPU latency limits by the ratio of the two runs' probes (benchmarks.regress)."""
    import torch

    a = torch.randn(PROBE_SIZE, PROBE_SIZE, generator=torch.Generator().manual_seed(0))

    def work():
        y = a
        for _ in range(PROBE_CHAIN):
            y = torch.tanh(a @ y)

    with torch.inference_mode():
        return time_callable(work, 2, repeats)["median_ms"]


def time_callable(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 wall time of `fn()` in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return _stats(times)


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """`time_callable` of several callables, timed in turns: each round calls every one once, in
    an order reversed every other round, so drift of the machine's speed (a shared VM's neighbours,
    CPU clocks) falls on all of them alike and their ratio measures the models, not the minute."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _stats(t) for name, t in times.items()}


def turns_for(fns: dict[str, Callable[[], object]], least: int, budget_ms: float, most: int = 500) -> int:
    """How many turns `time_interleaved` takes so the slowest callable runs for about `budget_ms`
    (at least `least`, at most `most`): one call each, timed once, sets it. A fixed count of a few
    calls left the digits UNet's speed-up swinging 1.2-1.8x between runs minutes apart."""
    slowest = max(time_callable(fn, 0, 1)["median_ms"] for fn in fns.values())
    return int(min(most, max(least, np.ceil(budget_ms / max(slowest, 1e-3)))))


def _stats(times: list[float]) -> dict[str, float]:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(p90, 3), "repeats": len(times)}


def torch_unet_latency(unet, inputs: dict[str, np.ndarray], warmup: int, repeats: int, device: str = "cpu") -> dict:
    """UNet forward latency in PyTorch under inference mode (CUDA: synchronised)."""
    import torch

    args = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    unet = unet.to(device).eval()

    def forward():
        with torch.inference_mode():
            unet(args["sample"], args["timestep"], encoder_hidden_states=args["encoder_hidden_states"])
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return time_callable(forward, warmup, repeats)


def ort_latency(session, inputs: dict[str, np.ndarray], warmup: int, repeats: int) -> dict:
    """Latency of one ONNX Runtime session."""
    feed = ort_feed(session, inputs)
    return time_callable(lambda: session.run(None, feed), warmup, repeats)


def composed_image_latency(
    rows: list[dict], steps: int, keys: tuple[str, ...] = ("median_ms", "p90_ms")
) -> dict[str, float] | None:
    """Per-image {key: ms} for each of `keys` from component timings: text encoder (batch 2) +
    steps x UNet (batch 2) + VAE decoder (batch 1), each statistic summed; None unless all three
    were measured with the UNet at batch 2."""
    by_component = {row["component"]: row for row in rows}
    if not {"text_encoder", "unet", "vae_decoder"} <= set(by_component) or by_component["unet"].get("batch") != 2:
        return None
    return {
        key: round(
            by_component["text_encoder"][key] + steps * by_component["unet"][key] + by_component["vae_decoder"][key], 3
        )
        for key in keys
    }
