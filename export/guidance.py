"""Guidance fidelity: does a compressed UNet keep the text's pull on the image?

Classifier-free guidance draws with eps(x, ∅) + s * (eps(x, c) - eps(x, ∅)). The difference, the
guidance signal, is small next to eps itself, so a quantization can keep the output's PSNR high
while crushing it: Qualcomm's W8A16 SD UNet shrank it from 0.175 to 0.0091 and drew near-monochrome
images (ai-hub-apps issue 155). Output parity cannot see that; this check measures the signal.

    entry = guidance_fidelity(reference_fn, test_fn, feeds, num_train_timesteps=1000)
    check_guidance(entry)  # export.validate.ParityError below the floors

`feeds` are guided UNet feeds of the pipeline's own trajectories, {"sample": (2N, C, h, w),
"timestep": (), "encoder_hidden_states": (2N, L, D)} with the N unconditional rows first (what
`toolchain.runtime.sampler` feeds and `export.quantize.collect_unet_calibration` records): use a
seed the calibration did not see. `reference_fn(feed)` / `test_fn(feed)` return the UNet's
output (2N, C, h, w) for a feed: any runtime (ONNX Runtime, the QNN HTP backend, ExecuTorch).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Timestep bands, as fractions of the training schedule: guidance matters differently at high noise
# (layout) and low noise (detail), and a quantization can fail in one band only.
BANDS = (("high noise", 2 / 3, 1.0), ("mid", 1 / 3, 2 / 3), ("low noise", 0.0, 1 / 3))
# Floors: every band's mean cosine, and its norm ratio within [1/1.25, 1.25]. The phone-runtime
# issue's bar is cosine >= 0.98; the crushed W8A16 model above had a norm ratio of 0.05.
COSINE_FLOOR = 0.98
NORM_RATIO_RANGE = (0.8, 1.25)

UnetFn = Callable[[dict[str, np.ndarray]], np.ndarray]


def guidance_signal(output: np.ndarray) -> np.ndarray:
    """eps(x, c) - eps(x, ∅) per image, (N, C*h*w), from a guided output (2N, C, h, w)."""
    output = np.asarray(output, dtype=np.float64)
    n = len(output) // 2
    if n < 1 or len(output) != 2 * n:
        raise ValueError(f"a guided UNet output has an even batch (unconditional, conditional), got {len(output)}")
    return (output[n:] - output[:n]).reshape(n, -1)


def guidance_fidelity(
    reference_fn: UnetFn,
    test_fn: UnetFn,
    feeds: list[dict[str, np.ndarray]],
    num_train_timesteps: int = 1000,
    cosine_floor: float = COSINE_FLOOR,
    norm_ratio_range: tuple[float, float] = NORM_RATIO_RANGE,
) -> dict:
    """Cosine and norm ratio of the test UNet's guidance signal against the reference's, per band.

    Returns {"cosine": worst band mean, "norm_ratio": the band ratio farthest from 1, "images": the
    guided images compared, "bands": [{"band", "t_min", "t_max", "feeds", "images", "cosine",
    "cosine_min", "norm_ratio", "reference_norm"}], "cosine_floor", "norm_ratio_range"}. A band with
    no feed is left out; non-finite outputs give NaN, which the gate fails.
    """
    per_band: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name, _, _ in BANDS}
    for feed in feeds:
        band = _band(float(np.asarray(feed["timestep"]).reshape(-1)[0]), num_train_timesteps)
        per_band[band].append((guidance_signal(reference_fn(feed)), guidance_signal(test_fn(feed))))
    bands = [_band_entry(name, lo, hi, num_train_timesteps, per_band[name]) for name, lo, hi in BANDS if per_band[name]]
    if not bands:
        raise ValueError("guidance fidelity needs at least one feed")
    worst_ratio = max((b["norm_ratio"] for b in bands), key=lambda r: abs(np.log(r)) if r > 0 else np.inf)
    return {
        "cosine": min(b["cosine"] for b in bands),
        "norm_ratio": worst_ratio,
        "images": sum(b["images"] for b in bands),
        "bands": bands,
        "cosine_floor": cosine_floor,
        "norm_ratio_range": list(norm_ratio_range),
    }


def _band(t: float, num_train_timesteps: int) -> str:
    fraction = t / max(num_train_timesteps - 1, 1)
    return next(name for name, lo, _ in BANDS if fraction >= lo)


def _band_entry(name: str, lo: float, hi: float, total: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    ref = np.concatenate([r for r, _ in pairs])
    test = np.concatenate([t for _, t in pairs])
    ref_norm, test_norm = np.linalg.norm(ref, axis=1), np.linalg.norm(test, axis=1)
    cosines = np.sum(ref * test, axis=1) / np.maximum(ref_norm * test_norm, 1e-30)
    # no signal to compare (a model that ignores its text, or only empty prompts): unjudged, NaN, fails
    finite = np.isfinite(ref).all() and np.isfinite(test).all() and float(np.sum(ref_norm)) > 0
    nan = float("nan")
    return {
        "band": name,
        "t_min": round(lo * (total - 1)),
        "t_max": round(hi * (total - 1)),
        "feeds": len(pairs),
        "images": len(ref),
        "cosine": float(np.mean(cosines)) if finite else nan,
        "cosine_min": float(np.min(cosines)) if finite else nan,
        "norm_ratio": float(np.sum(test_norm) / max(np.sum(ref_norm), 1e-30)) if finite else nan,
        "reference_norm": float(np.mean(ref_norm)) if finite else nan,
    }


def check_guidance(entry: dict, component: str = "unet", label: str = "", hint: str = "") -> None:
    """export.validate.ParityError when any band's cosine is under the floor or its norm ratio
    outside the range; NaN (a non-finite output) fails too. `hint`: what the caller's user can change."""
    from export.validate import ParityError

    lo, hi = entry["norm_ratio_range"]
    failed = [
        b
        for b in entry["bands"]
        if not (b["cosine"] >= entry["cosine_floor"]) or not (lo <= b["norm_ratio"] <= hi)  # `not` so NaN fails
    ]
    if failed:
        listed = "; ".join(
            f"{b['band']} (t {b['t_min']}-{b['t_max']}): cosine {b['cosine']:.3f}, norm ratio {b['norm_ratio']:.3f}"
            for b in failed
        )
        raise ParityError(
            f"{component}{f' ({label})' if label else ''}: the guidance signal eps(x, c) - eps(x, ∅) departs from "
            f"the fp32 model's ({listed}; floors: cosine >= {entry['cosine_floor']}, norm ratio in [{lo}, {hi}]): "
            "the deliverable follows the prompt differently from the model it came from"
            + (f"; {hint}" if hint else "; keep 16-bit activations (W8A16) or more layers in higher precision")
        )


def onnx_unet_fn(path, providers: list[str] | None = None) -> UnetFn:
    """The UNet at `path` in an ONNX Runtime session (CPU unless `providers` says otherwise), as a
    function of a feed: its first output, float32."""
    from toolchain.runtime.ort import ort_feed, ort_session

    session, _ = ort_session(path, providers=providers)

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run(None, ort_feed(session, feed))[0], dtype=np.float32)

    return run
