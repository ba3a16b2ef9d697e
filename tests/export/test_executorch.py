"""--target executorch on the tiny model: one `.pte` per component with the XNNPACK delegate, every
program run through ExecuTorch's runtime (parity, the guidance gate, the benchmark's images and
times), the 8-bit UNet, and bad input refused before any work."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import numpy as np
import pytest

pytest.importorskip("executorch")

from export.executorch import (  # noqa: E402
    collect_torch_feeds,
    executorch_unet_fn,
    export_executorch,
    torch_unet_fn,
)
from export.guidance import check_guidance, guidance_fidelity  # noqa: E402
from export.validate import ParityError  # noqa: E402
from toolchain.runtime.executorch import PROVIDER, ExecuTorchSession, executorch_opener  # noqa: E402
from toolchain.runtime.ort import OrtPipeline  # noqa: E402

from ..conftest import run  # noqa: E402

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
FILES = {c: f"{c}/model.pte" for c in COMPONENTS}
PROMPTS = ["a photo", "a cat"]


@pytest.fixture(scope="module")
def et_run(tiny_sd_dir, tmp_path_factory):
    """`compress --target executorch --recipe tiny` on the tiny model (its target profile benchmarks under
    the phone-xnnpack device profile): the run folder."""
    out = tmp_path_factory.mktemp("et") / "run"
    # the source itself (no prune, no finetune: those stages have their own tests): the target is what is tested
    assert run(tiny_sd_dir, out, "--target", "executorch", "prune.method=none", "finetune.enabled=false") == 0
    return out


def test_every_component_is_one_program_checked_through_the_runtime(et_run):
    deploy = et_run / "deploy" / "executorch"
    (stage,) = et_run.glob("[0-9][0-9]-executorch")
    manifest = json.loads((stage / "manifest.json").read_text())
    parity = {row["component"]: row for row in manifest["metrics"]["parity"]}
    assert set(parity) == set(COMPONENTS)
    for component in COMPONENTS:
        row = parity[component]
        assert row["runtime"] == PROVIDER and row["format"] == "executorch-fp32" and row["reference"] == "torch-fp32"
        assert row["psnr_db"] >= row["psnr_floor_db"] == 60.0  # fp32 through XNNPACK: the same arithmetic
        assert (deploy / component / "model.pte").is_file()
        assert "_name_or_path" not in json.loads((deploy / component / "config.json").read_text())
    assert (deploy / "tokenizer" / "vocab.json").is_file() and (
        deploy / "scheduler" / "scheduler_config.json"
    ).is_file()
    layout = json.loads((deploy / "executorch.json").read_text())
    assert layout["delegate"] == "XNNPACK" and layout["batches"] == {"text_encoder": 2, "unet": 2, "vae_decoder": 1}
    unet = ExecuTorchSession(deploy / "unet" / "model.pte", "unet")
    assert [i.name for i in unet.get_inputs()] == ["sample", "timestep", "encoder_hidden_states"]
    assert [i.shape for i in unet.get_inputs()] == [v[0] for v in layout["inputs"]["unet"].values()]
    (guidance,) = manifest["metrics"]["guidance"]
    assert guidance["runtime"] == PROVIDER and guidance["cosine"] >= 0.999 and guidance["images"] > 0


def test_the_sampler_draws_pytorchs_images_through_executorch(et_run):
    """The deliverable's programs, sampled through the one sampler in ExecuTorch's runtime, draw the
    images its PyTorch pipeline draws from the same seed."""
    from toolchain import artifact as art
    from toolchain.models.io import load_pipeline
    from toolchain.runtime.pytorch import diffusers_generator

    torch_dir = [p for p in sorted(et_run.glob("0[0-9]-*")) if art.load(p).kind == "diffusers"][-1]
    pipe = OrtPipeline(et_run / "deploy" / "executorch", FILES, open_session=executorch_opener())
    assert pipe.provider == PROVIDER and pipe.max_prompts == 1  # a guided pair per UNet call
    images = pipe(PROMPTS, 3, steps=4, guidance_scale=5.0)
    reference = diffusers_generator(load_pipeline(art.load(torch_dir).files), steps=4, guidance_scale=5.0)(PROMPTS, 3)
    assert images.shape == reference.shape and np.abs(images - reference).max() < 1e-4


def test_report_times_the_programs_in_their_runtime_and_says_where(et_run):
    report = json.loads((et_run / "report.json").read_text())
    rows = [r for r in report["latency"] if r["runtime"] == "executorch"]
    assert {r["component"] for r in rows} >= {*COMPONENTS, "image"}
    assert all(r["provider"] == PROVIDER and r["median_ms"] > 0 for r in rows)
    assert "on x86" in PROVIDER
    assert report["executorch"]["executorch"] and report["executorch"]["precision"] == "fp32"
    profile = report["device_profile"]
    assert profile["name"] == "phone-xnnpack" and profile["runtime"] == "executorch" and profile["emulated"] is True
    memory = [r for r in report["memory"] if r["runtime"] == "executorch"]  # each in a fresh ExecuTorch process
    assert {r["component"] for r in memory} == {*COMPONENTS, "image"}
    assert all(r["provider"] == PROVIDER and 0 < r["peak_rss_bytes"] < r["memory_budget_bytes"] for r in memory)
    assert any("no side by side for executorch" in w for w in report["warnings"])
    card = (et_run / "deploy" / "executorch" / "README.md").read_text()
    assert "unet/model.pte" in card and "ExecuTorch" in card


@pytest.mark.slow  # 2 min on 2 cores: ExecuTorch's lowering runs a pass per XNNPACK partition (55 on this UNet)
def test_8bit_unet_keeps_parity_and_its_guidance_is_measured(tiny_sd_dir, tmp_path):
    """XNNPACK's 8-bit UNet (PT2E, calibrated on trajectories): a smaller program within the 8-bit
    floor, whose guidance signal the gate measures against fp32 through the runtime."""
    from toolchain.models.io import load_pipeline

    pipe = load_pipeline(tiny_sd_dir)
    feeds = collect_torch_feeds(pipe, PROMPTS, 6, 5.0, seed=0, n=2)
    held_out = collect_torch_feeds(pipe, PROMPTS, 6, 5.0, seed=1, n=3)
    result = export_executorch(
        pipe, tmp_path / "int8", "int8", feeds, held_out[1], progress=False, components=("unet",)
    )
    (parity,) = result["parity"]
    assert parity["component"] == "unet" and parity["format"] == "executorch-int8"
    assert 20.0 <= parity["psnr_db"] < 60.0  # within the 8-bit floor, below fp32's (140+ dB)
    fp32_unet_bytes = sum(p.numel() * 4 for p in pipe.unet.parameters())
    assert result["files"]["unet"]["size_bytes"] < 0.5 * fp32_unet_bytes  # int8 weights
    entry = guidance_fidelity(
        torch_unet_fn(pipe), executorch_unet_fn(tmp_path / "int8" / "unet" / "model.pte"), held_out
    )
    # measured on this random tiny UNet: cosine 0.50, as ORT's uint8 int8 crushes the digits UNet's
    assert 0 < entry["cosine"] < entry["cosine_floor"] and entry["images"] == 2 * len(held_out)
    with pytest.raises(ParityError, match="guidance signal"):
        check_guidance(entry, label="executorch-int8")
    with pytest.raises(ValueError, match="calibration"):
        export_executorch(pipe, tmp_path / "none", "int8", None)
    assert not (tmp_path / "none").exists()


def test_8da4w_quantizes_the_linear_layers_to_int4_and_runs_through_xnnpack(tmp_path):
    """torchao's 8da4w on the Linear layers of a block (an attention projection's shape): the program
    holds int4 weights (under a quarter of fp32's bytes), runs through ExecuTorch's runtime as the
    quantized PyTorch module does, and leaves the source module fp32."""
    import torch

    from export.executorch import _dynamic_int4, _lower

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    before = [p.clone() for p in block.parameters()]
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 16, 64)).astype(np.float32)}
    _lower(block, inputs, None, tmp_path / "fp32.pte")
    _lower(block, inputs, None, tmp_path / "q.pte", "8da4w")
    assert all(torch.equal(a, b) for a, b in zip(before, block.parameters(), strict=True))
    fp32_weights = sum(p.numel() * 4 for p in block.parameters())
    assert (tmp_path / "q.pte").stat().st_size < (tmp_path / "fp32.pte").stat().st_size - 0.7 * fp32_weights
    with torch.no_grad():
        reference = block(torch.from_numpy(inputs["x"])).numpy()
        quantized = _dynamic_int4(block)(torch.from_numpy(inputs["x"])).numpy()
    out = ExecuTorchSession(tmp_path / "q.pte", "block").run(None, {"input_0": inputs["x"]})[0]
    assert (
        np.abs(out - quantized).max() < 0.1 * np.abs(out - reference).max() + 1e-3
    )  # the runtime runs what torchao made
    assert 0 < np.abs(out - reference).max() < 0.5  # int4 weights: close to fp32, not equal


def test_cli_refuses_bad_executorch_input_before_any_work(tiny_sd_dir, tmp_path, capsys, monkeypatch):
    from toolchain.runtime import executorch as runtime

    assert run(tiny_sd_dir, tmp_path / "a", "--target", "executorch", "quantize.enabled=true") == 2
    assert "executorch.precision" in capsys.readouterr().err
    assert run(tiny_sd_dir, tmp_path / "b", "--target", "executorch", "executorch.precision=int4") == 2
    assert "executorch.precision" in capsys.readouterr().err
    assert run(tiny_sd_dir, tmp_path / "d", "--target", "onnx", "benchmark.profile=phone-xnnpack") == 2
    assert "--target executorch" in capsys.readouterr().err  # the profile says what it runs through

    def missing():
        raise runtime.ExecuTorchUnavailable("--target executorch needs ExecuTorch: pip install 'x[executorch]'")

    monkeypatch.setattr(runtime, "require_executorch", missing)
    assert run(tiny_sd_dir, tmp_path / "c", "--target", "executorch") == 2
    assert "pip install" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abcd")
