"""Latency: warm-up, then timed repeats; median and p90 in milliseconds.

Inputs are built from the component's own config so the same numbers can be taken for any
Stable Diffusion pipeline, pruned or not, in PyTorch and in ONNX Runtime.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def time_callable(fn: Callable[[], object], warmup: int, repeats: int) -> dict[str, float]:
    """Median and p90 wall time of `fn()` in ms after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    p90 = times[min(len(times) - 1, int(np.ceil(0.9 * len(times))) - 1)]
    return {"median_ms": round(statistics.median(times), 3), "p90_ms": round(p90, 3), "repeats": repeats}


def component_inputs(pipeline_dir: Path, component: str, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for one component, named as in optimum's ONNX layout; `pipeline_dir` is a
    diffusers folder or an exported ONNX folder (both carry the component configs).

    text_encoder: input_ids (batch, max_length) int64
    unet: sample (batch, C, h, w), timestep (batch,), encoder_hidden_states (batch, max_length, D)
    vae_decoder: latent_sample (batch // 2 or 1, C, h, w)  -- one image per guided pair
    """
    rng = np.random.default_rng(seed)
    unet = _read_config(pipeline_dir, "unet")
    text = _read_config(pipeline_dir, "text_encoder")
    max_len = json.loads((pipeline_dir / "tokenizer" / "tokenizer_config.json").read_text()).get(
        "model_max_length", text.get("max_position_embeddings", 77)
    )
    max_len = min(int(max_len), int(text.get("max_position_embeddings", max_len)))
    size = unet["sample_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    latent = (unet["in_channels"], *size)
    if component == "text_encoder":
        ids = rng.integers(0, text["vocab_size"], size=(batch, max_len))
        return {"input_ids": ids.astype(np.int64)}
    if component == "unet":
        return {
            "sample": rng.standard_normal((batch, *latent)).astype(np.float32),
            "timestep": np.full((batch,), 500, dtype=np.int64),
            "encoder_hidden_states": rng.standard_normal((batch, max_len, unet["cross_attention_dim"])).astype(
                np.float32
            ),
        }
    if component == "vae_decoder":
        vae = _read_config(pipeline_dir, "vae" if (pipeline_dir / "vae").is_dir() else "vae_decoder")
        return {
            "latent_sample": rng.standard_normal((max(1, batch // 2), vae["latent_channels"], *size)).astype(np.float32)
        }
    raise ValueError(f"no example inputs for component {component!r}")


def _read_config(pipeline_dir: Path, component: str) -> dict:
    for name in ("config.json", "scheduler_config.json"):
        path = pipeline_dir / component / name
        if path.is_file():
            return json.loads(path.read_text())
    raise FileNotFoundError(f"{pipeline_dir / component}: no config.json")


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


def ort_session(onnx_path: Path, threads: int = 0):
    """An ONNX Runtime CPU session; returns (session, provider that actually runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return session, session.get_providers()[0]


def ort_feed(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast inputs to the dtypes the graph declares; a scalar input (optimum's UNet timestep)
    takes the first element."""
    dtypes = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
    }
    feed = {}
    for spec in session.get_inputs():
        value = inputs[spec.name].astype(dtypes.get(spec.type, np.float32))
        feed[spec.name] = value.reshape(-1)[:1].reshape(()) if len(spec.shape) == 0 else value
    return feed


def ort_latency(session, inputs: dict[str, np.ndarray], warmup: int, repeats: int) -> dict:
    """Latency of one ONNX Runtime session."""
    feed = ort_feed(session, inputs)
    return time_callable(lambda: session.run(None, feed), warmup, repeats)
