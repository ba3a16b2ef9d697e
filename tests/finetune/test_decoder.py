"""Stage `decoder`: a tiny VAE decoder distilled from the pipeline's own VAE, carried through export."""

import json

import numpy as np
import pytest
import torch

from toolchain.config import ConfigError, DecoderConfig

from ..conftest import run

FAST = {"channels": 16, "blocks": 1, "steps": 150, "batch_size": 8, "lr": 2e-3}


def test_distilled_decoder_draws_what_the_vae_draws(tiny_pipe):
    """On held-out latents the trained decoder is far closer to the VAE than the untrained one;
    it has no attention and no GroupNorm, and reads latents of the VAE's shape."""
    from diffusers.models.attention_processor import Attention

    from toolchain.finetune.decoder import distill_decoder, vae_images

    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    student, summary = distill_decoder(tiny_pipe.vae, latents, DecoderConfig(**FAST))
    assert summary["held_out"]["psnr_db"] > summary["held_out_untrained"]["psnr_db"] + 6
    assert summary["held_out"]["n"] == 6 and summary["decoder_params"] > 0
    assert not any(isinstance(m, (Attention, torch.nn.GroupNorm)) for m in student.decoder.modules())
    with torch.no_grad():
        assert student.decode(latents[:2]).sample.shape == vae_images(tiny_pipe.vae, latents[:2]).shape


def test_bad_decoder_settings_are_refused():
    for bad, match in (({"channels": 0}, "decoder.channels"), ({"held_out": 1.0}, "decoder.held_out")):
        with pytest.raises(ConfigError, match=match):
            DecoderConfig(**bad)


def test_decoder_stage_ships_through_onnx(tiny_sd_dir, tmp_path):
    """decoder.enabled=true: the chain gets a decoder stage after finetune, whose pipeline loads with
    an AutoencoderTiny, exports within the parity gate and is judged and timed like any stage."""
    from toolchain import artifact as art
    from toolchain.models.io import load_pipeline
    from toolchain.runtime.ort import OrtPipeline

    out = tmp_path / "out"
    settings = [f"decoder.{k}={v}" for k, v in FAST.items()]
    settings += ["decoder.enabled=true", "finetune.enabled=true", "finetune.mode=distill", "finetune.steps=2"]
    settings += ["finetune.samples_per_prompt=1", "finetune.sample_steps=2", "finetune.batch_size=2"]
    assert run(tiny_sd_dir, out, *settings) == 0
    assert [p.name for p in sorted(out.glob("[0-9][0-9]-*"))] == [
        "00-source", "01-prune", "02-finetune", "03-decoder", "04-export", "05-benchmark",
    ]  # fmt: skip
    decoder = art.load(out / "03-decoder")
    assert type(load_pipeline(decoder.path).vae).__name__ == "AutoencoderTiny"
    assert decoder.records["decoder"]["teacher_samples"]["hit"], "finetune's teacher samples are reused"
    index = json.loads((out / "deploy" / "onnx" / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    parity = {r["component"]: r for r in json.loads((out / "report.json").read_text())["parity"]}
    assert parity["vae_decoder"]["max_abs_err"] <= parity["vae_decoder"]["tolerance"]
    report = json.loads((out / "report.json").read_text())
    sizes = {r["component"]: r["size_ratio"] for r in report["side_by_side"]["rows"] if "method" not in r}
    assert sizes["vae_decoder"] < 1  # smaller than the VAE decoder it replaced
    images = OrtPipeline(out / "deploy" / "onnx")(["a photo"], seed=0, steps=3)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_tiny_vae_encoder_export_is_refused(tiny_sd_dir, tmp_path):
    from toolchain.cli import main

    args = ["--target", "onnx", "--model", str(tiny_sd_dir), "--out", str(tmp_path / "o"), "--dry-run"]
    assert main([*args, "decoder.enabled=true", "export.components=[text_encoder,unet,vae_decoder,vae_encoder]"]) == 2
