"""The guidance gate: a UNet whose text path was crushed passes output parity and fails here."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from export.guidance import check_guidance, guidance_fidelity, guidance_signal, onnx_unet_fn
from export.quantize import INT8_PSNR_FLOOR_DB, collect_unet_calibration, onnx_pair_parity
from export.validate import ParityError
from toolchain.artifact import Artifact
from toolchain.config import ConfigError, QuantizeConfig, QuantizeSettings

PROMPTS = ["a photo", "a cat"]
STEPS = 25


@pytest.fixture(scope="module")
def held_out(tiny_onnx):
    """Seven feeds of a trajectory the calibration never saw: every timestep band has two or three."""
    return collect_unet_calibration(tiny_onnx, PROMPTS, steps=STEPS, seed=1, n=7, threads=1)


def _crushed(src: Path, out: Path, scale: float) -> Path:
    """`src` with the text states through a uint8 QuantizeLinear/DequantizeLinear pair of step `scale`:
    a quantizer whose activation range for the text path was fitted far too wide. At scale 10 every
    prompt's states round to 0, so the conditional and unconditional outputs are the same."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph, name = model.graph, "encoder_hidden_states"
    for node in graph.node:
        node.input[:] = [f"{name}_dq" if i == name else i for i in node.input]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(scale, np.float32), "s"),
            numpy_helper.from_array(np.array(128, np.uint8), "z"),
        ]
    )
    graph.node.insert(0, helper.make_node("QuantizeLinear", [name, "s", "z"], [f"{name}_q"]))
    graph.node.insert(1, helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"]))
    onnx.save(model, str(out))
    return out


def test_crushed_text_path_passes_parity_and_fails_the_gate(tiny_onnx, held_out, tmp_path):
    fp32 = tiny_onnx / "unet" / "model.onnx"
    crushed = _crushed(fp32, tmp_path / "crushed.onnx", scale=10.0)
    parity_feed = held_out[len(held_out) // 2]  # the feed the quantize stage's PSNR gate uses
    _, psnr_db = onnx_pair_parity(fp32, crushed, parity_feed)
    assert psnr_db >= INT8_PSNR_FLOOR_DB + 10, psnr_db  # plain output parity lets it through, with room
    entry = guidance_fidelity(onnx_unet_fn(fp32), onnx_unet_fn(crushed), held_out)
    assert entry["norm_ratio"] == pytest.approx(0.0, abs=1e-6)
    assert [b["band"] for b in entry["bands"]] == ["high noise", "mid", "low noise"]
    assert entry["images"] == len(held_out) * len(PROMPTS)
    with pytest.raises(ParityError, match="guidance signal"):
        check_guidance(entry)


def test_a_milder_crush_fails_on_direction_not_only_size(tiny_onnx, held_out, tmp_path):
    fp32 = tiny_onnx / "unet" / "model.onnx"
    coarse = _crushed(fp32, tmp_path / "coarse.onnx", scale=2.0)  # a few levels per text feature
    assert onnx_pair_parity(fp32, coarse, held_out[3])[1] >= 35.0
    entry = guidance_fidelity(onnx_unet_fn(fp32), onnx_unet_fn(coarse), held_out)
    assert entry["cosine"] < 0.95, entry
    with pytest.raises(ParityError, match="cosine"):
        check_guidance(entry)


def test_identical_model_passes_and_nan_fails(tiny_onnx, held_out):
    fp32 = onnx_unet_fn(tiny_onnx / "unet" / "model.onnx")
    entry = guidance_fidelity(fp32, fp32, held_out)
    assert entry["cosine"] == pytest.approx(1.0) and entry["norm_ratio"] == pytest.approx(1.0)
    check_guidance(entry)
    broken = guidance_fidelity(fp32, lambda feed: np.full_like(fp32(feed), np.nan), held_out[:1])
    assert np.isnan(broken["cosine"])
    with pytest.raises(ParityError):
        check_guidance(broken)


def test_no_signal_is_unjudged_and_fails(tiny_onnx, held_out):
    """Empty prompts on both halves: nothing to compare, so the gate fails instead of passing a 0/0."""
    fp32 = onnx_unet_fn(tiny_onnx / "unet" / "model.onnx")
    feed = dict(held_out[0])
    states = feed["encoder_hidden_states"].copy()
    states[len(states) // 2 :] = states[: len(states) // 2]
    entry = guidance_fidelity(fp32, fp32, [{**feed, "encoder_hidden_states": states}])
    assert np.isnan(entry["cosine"]) and np.isnan(entry["norm_ratio"])
    with pytest.raises(ParityError):
        check_guidance(entry)


def test_signal_is_conditional_minus_unconditional():
    out = np.stack([np.zeros((1, 2, 2)), np.ones((1, 2, 2)), 3 * np.ones((1, 2, 2)), np.ones((1, 2, 2))])
    np.testing.assert_array_equal(guidance_signal(out), [[3.0] * 4, [0.0] * 4])
    with pytest.raises(ValueError, match="even batch"):
        guidance_signal(out[:3])


def test_quantize_stage_records_and_enforces_the_gate(tiny_onnx, tmp_path):
    from toolchain.errors import GateError
    from toolchain.stages import quantize as stage

    def run(name, **kwargs):
        ctx = SimpleNamespace(out_dir=tmp_path / name, progress=False)
        ctx.out_dir.mkdir()
        cfg = QuantizeConfig(
            enabled=True, calibration_text=PROMPTS, calibration_prompts=2, calibration_feeds=4, **kwargs
        )
        return stage.run(Artifact(path=tiny_onnx, kind="onnx"), QuantizeSettings(cfg, []), ctx)

    # uint8 activations round the small cond/uncond differences to whole steps (the digits UNet:
    # cosine 0.35-0.40 at output PSNR 35-38 dB); the random tiny UNet's signal goes the same way
    with pytest.raises(GateError, match="guidance signal.*quantize.activation_type=QUInt16"):
        run("w8a8")
    (row,) = run("w8a16", activation_type="QUInt16").metrics["guidance"]
    assert (row["component"], row["format"], row["reference"]) == ("unet", "onnx-int8", "onnx-fp32")
    assert row["cosine"] >= 0.98 and 0.8 <= row["norm_ratio"] <= 1.25 and row["images"] > 0
    loose = run("stated", guidance_cosine_floor=0.0, guidance_norm_ratio=[0.1, 10.0]).metrics["guidance"][0]
    assert loose["cosine_floor"] == 0.0 and loose["cosine"] < 0.98  # accepted, with the floor it was held to


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"guidance_cosine_floor": 1.5}, "quantize.guidance_cosine_floor"),
        ({"guidance_norm_ratio": [1.1, 1.25]}, "quantize.guidance_norm_ratio"),
        ({"guidance_norm_ratio": [0.8]}, "quantize.guidance_norm_ratio"),
        ({"activation_type": "QUInt16", "quant_format": "QOperator"}, "quantize.activation_type"),
    ],
)
def test_floors_are_validated(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        QuantizeConfig(**kwargs)
