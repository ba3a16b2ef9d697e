"""Core ML export of the tiny Stable Diffusion pipeline: Swift-package layout, spec, compression, refusals.

Core ML cannot run models on Linux, so everything here reads the written packages' specs; the
prediction parity test is marked `macos` and skips elsewhere.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import json

import numpy as np
import pytest
import torch

from export.coreml import (
    PSNR_FLOOR_DB,
    SplitEinsumAttnProcessor,
    export_coreml,
)

PACKAGES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder"}


@pytest.fixture(scope="module")
def fp16_export(tiny_pipe, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("coreml") / "fp16"
    return out_dir, export_coreml(tiny_pipe, out_dir, progress=False)


@pytest.fixture(scope="module")
def unet_only(tiny_pipe, tmp_path_factory):
    """UNet-only exports by compression, made once per module: {compression: (out_dir, result)}."""
    made = {}

    def export(compression, **kwargs):
        key = (compression, tuple(sorted(kwargs.items())))
        if key not in made:
            out_dir = tmp_path_factory.mktemp("coreml") / compression
            made[key] = (
                out_dir,
                export_coreml(
                    tiny_pipe, out_dir, compression=compression, components=("unet",), progress=False, **kwargs
                ),
            )
        return made[key]

    return export


def test_writes_swift_package_layout(fp16_export, tiny_pipe):
    out_dir, result = fp16_export
    for name, package in PACKAGES.items():
        assert (out_dir / f"{package}.mlpackage" / "Manifest.json").is_file()
        entry = result["files"][name]
        assert entry["path"] == f"{package}.mlpackage"
        assert entry["size_bytes"] > entry["weights_bytes"] > 0
        assert entry["weights_bytes"] == entry["uncompressed_weights_bytes"]  # nothing compressed
    # the Swift package's BPETokenizer reads these two files next to the models
    assert (out_dir / "vocab.json").is_file() and (out_dir / "merges.txt").is_file()
    assert len(json.loads((out_dir / "vocab.json").read_text())) == len(tiny_pipe.tokenizer.encoder)
    assert result["precision"] == "fp16" and result["compression"] == "none" and result["compressed_components"] == []
    assert result["decoder_scale_factor"] == pytest.approx(tiny_pipe.vae.config.scaling_factor)
    assert result["parity"] == []  # off macOS; on macOS see test_prediction_matches_pytorch


def test_spec_names_shapes_and_target(fp16_export, tiny_pipe):
    _, result = fp16_export
    seq_len = tiny_pipe.text_encoder.config.max_position_embeddings  # 32
    hidden = tiny_pipe.text_encoder.config.hidden_size  # 32
    latent = tiny_pipe.unet.config.sample_size  # 8
    pixels = 16

    def shapes(side, name):
        assert all(f["dtype"] == "float32" for f in result["spec"][name][side].values())
        return {k: f["shape"] for k, f in result["spec"][name][side].items()}

    assert shapes("inputs", "text_encoder") == {"input_ids": [1, seq_len]}
    assert shapes("outputs", "text_encoder") == {
        "last_hidden_state": [1, seq_len, hidden],
        "pooled_outputs": [1, hidden],
    }
    assert shapes("inputs", "unet") == {
        "sample": [2, 4, latent, latent],
        "timestep": [2],
        "encoder_hidden_states": [2, hidden, 1, seq_len],  # Apple's [B, D, 1, L]
    }
    assert shapes("outputs", "unet") == {"noise_pred": [2, 4, latent, latent]}
    assert shapes("inputs", "vae_decoder") == {"z": [1, 4, latent, latent]}
    assert shapes("outputs", "vae_decoder") == {"image": [1, 3, pixels, pixels]}
    for spec in result["spec"].values():
        assert spec["model_type"] == "mlProgram"
        assert spec["spec_version"] >= 8 and spec["deployment_target"] == "iOS17"
        assert not any(op.startswith("constexpr_") for op in spec["ops"])


def test_reference_inputs_and_outputs_are_stored(fp16_export, tiny_pipe):
    out_dir, _ = fp16_export
    stored = np.load(out_dir / "reference" / "Unet.npz")
    assert sorted(stored.files) == sorted(
        ["input:sample", "input:timestep", "input:encoder_hidden_states", "output:noise_pred"]
    )
    # the stored output is what PyTorch gives on the stored inputs, in Apple's layout
    states = torch.from_numpy(stored["input:encoder_hidden_states"]).squeeze(2).transpose(1, 2)
    with torch.no_grad():
        expected = tiny_pipe.unet(
            torch.from_numpy(stored["input:sample"]), torch.from_numpy(stored["input:timestep"]), states
        ).sample
    np.testing.assert_allclose(stored["output:noise_pred"], expected.numpy(), atol=1e-5)
    for package in PACKAGES.values():
        assert (out_dir / "reference" / f"{package}.npz").is_file()


@pytest.mark.parametrize(
    ("compression", "target", "op", "max_ratio"),
    [
        # int8 halves fp16 weights; small tensors (< 2048 elements: biases, norms) stay fp16.
        ("int8", "iOS18", "constexpr_blockwise_shift_scale", 0.65),
        # 4-bit palettes: a quarter of fp16, plus the fp16 tensors left alone and the tables.
        ("palettize4", "iOS17", "constexpr_lut_to_dense", 0.40),
    ],
)
def test_compressed_unet_is_smaller(unet_only, fp16_export, compression, target, op, max_ratio):
    out_dir, result = unet_only(compression, minimum_deployment_target=target)
    spec = result["spec"]["unet"]
    assert spec["ops"].get(op, 0) > 0
    assert spec["deployment_target"] == target
    entry = result["files"]["unet"]
    fp16_weights = fp16_export[1]["files"]["unet"]["weights_bytes"]
    assert entry["uncompressed_weights_bytes"] == fp16_weights
    assert entry["weights_bytes"] / fp16_weights < max_ratio
    assert result["compressed_components"] == ["unet"]
    assert sorted(p.name for p in out_dir.glob("*.mlpackage")) == ["Unet.mlpackage"]


def test_int8_for_ios17_uses_affine_dequantize(unet_only):
    # linear_quantize_weights writes the iOS17 op for an iOS17 target (coremltools 9.0)
    _, result = unet_only("int8")
    assert result["spec"]["unet"]["ops"].get("constexpr_affine_dequantize", 0) > 0


def test_split_einsum_processor_matches_diffusers(tiny_pipe):
    unet = copy.deepcopy(tiny_pipe.unet).eval()
    torch.manual_seed(0)
    sample = torch.randn(2, 4, 8, 8)
    states = torch.randn(2, 32, 32)
    with torch.no_grad():
        expected = unet(sample, 10, states).sample
        unet.set_attn_processor(SplitEinsumAttnProcessor())
        got = unet(sample, 10, states).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_split_einsum_export_uses_einsum_and_restores_processors(tiny_pipe, unet_only):
    before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    was_training = tiny_pipe.unet.training
    _, result = unet_only("none", attention="split_einsum")
    ops = result["spec"]["unet"]["ops"]
    assert ops.get("einsum", 0) > 0 and "scaled_dot_product_attention" not in ops
    assert result["attention"] == "split_einsum"
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before
    assert tiny_pipe.unet.training == was_training


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"compression": "palettize5"}, "palettize6"),
        ({"attention": "foo"}, "split_einsum"),
        ({"minimum_deployment_target": "iOS15"}, "iOS17"),
        ({"compute_precision": "int4"}, "fp16"),
        ({"components": ("unet", "vae_encoder")}, "vae_decoder"),
        ({"components": ()}, "text_encoder"),
    ],
)
def test_bad_arguments_refused_before_writing(tiny_pipe, tmp_path, kwargs, named):
    out_dir = tmp_path / "deploy"
    with pytest.raises(ValueError, match=named):
        export_coreml(tiny_pipe, out_dir, progress=False, **kwargs)
    assert not out_dir.exists()


def test_lean_import():
    import subprocess
    import sys

    code = "import sys, export, export.coreml; sys.exit('coremltools' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_pruned_unet_converts(tiny_pipe, tmp_path):
    from toolchain.pruning import prune_unet_channels

    pipe = copy.copy(tiny_pipe)
    pipe.unet = copy.deepcopy(tiny_pipe.unet)
    prune_unet_channels(pipe.unet, 0.5)
    result = export_coreml(pipe, tmp_path / "pruned", components=("unet",), progress=False)
    assert result["spec"]["unet"]["inputs"]["sample"]["shape"] == [2, 4, 8, 8]
    assert result["spec"]["unet"]["outputs"]["noise_pred"]["shape"] == [2, 4, 8, 8]


@pytest.mark.macos
def test_prediction_matches_pytorch(tiny_pipe, tmp_path):
    result = export_coreml(tiny_pipe, tmp_path / "deploy", compression="int8", progress=False)
    enforced = [p for p in result["parity"] if p["enforced"]]
    assert sorted(p["component"] for p in enforced) == sorted(PACKAGES)
    for entry in enforced:
        assert entry["psnr_db"] >= PSNR_FLOOR_DB and entry["max_abs_err"] <= entry["tolerance"]
    assert [p["component"] for p in result["parity"] if p["compressed"]] == ["unet"]


def test_k_step_generator_ships_at_batch_one(tiny_sd_copy, tmp_path):
    """A folder with onestep.json is a k-step generator: it runs unguided, so its Unet package
    takes batch 1 (no [unconditional, conditional] duplication); the schedule travels with it."""
    from toolchain.models.io import load_pipeline
    from toolchain.runtime.schedule import write_schedule

    write_schedule(tiny_sd_copy, [625, 312], "epsilon", method="sfd")
    result = export_coreml(load_pipeline(tiny_sd_copy), tmp_path / "gen", components=("unet",), progress=False)
    assert result["spec"]["unet"]["inputs"]["sample"]["shape"] == [1, 4, 8, 8]
    assert result["spec"]["unet"]["inputs"]["timestep"]["shape"] == [1]
    assert result["spec"]["unet"]["outputs"]["noise_pred"]["shape"] == [1, 4, 8, 8]
    assert result["generator_schedule"] == [625, 312] and (tmp_path / "gen" / "onestep.json").is_file()
