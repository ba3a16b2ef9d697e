"""--target qnn on the tiny model: every component run on the QNN HTP backend (simulator), fixed
shapes, context binaries, the parity and guidance gates, and bad input refused before any work."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn")

from export.layout import guided_pairs  # noqa: E402
from export.qnn import prepare_qnn_folder  # noqa: E402
from export.quantize import collect_unet_calibration  # noqa: E402
from export.validate import ParityError  # noqa: E402
from toolchain.artifact import Artifact  # noqa: E402
from toolchain.config import QnnConfig, QnnSettings, QuantizeConfig  # noqa: E402
from toolchain.runtime.ort import OrtPipeline  # noqa: E402
from toolchain.runtime.qnn import htp_opener  # noqa: E402

PROMPTS = ["a photo", "a cat"]
FILES = {c: f"{c}/model.onnx" for c in ("text_encoder", "unet", "vae_decoder")}
# the random tiny text encoder at the HTP's fp16 (it has no fp32); the digits one measures 34.5 dB
TINY_FLOORS = {"fp16": 10.0, "w8a16": 10.0}


@pytest.fixture(scope="module")
def qnn_fp16(tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn") / "fp16"
    return out, prepare_qnn_folder(tiny_onnx, out, "fp16", psnr_floors_db=TINY_FLOORS, progress=False)


def _input_shapes(path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input}  # fmt: skip


def test_every_component_runs_on_the_htp_with_fixed_shapes(qnn_fp16):
    out, result = qnn_fp16
    rows = {r["component"]: r for r in result["parity"]}
    assert set(rows) == {"text_encoder", "unet", "vae_decoder"}
    for row in rows.values():
        assert row["runtime"] == "QNN HTP (simulator on x86)" and row["format"] == "qnn-fp16"
        assert row["psnr_db"] >= row["psnr_floor_db"] and row["htp_call_ms"] > 0
    assert rows["unet"]["psnr_db"] >= 50 and rows["vae_decoder"]["psnr_db"] >= 50  # fp16 on the HTP: 58.6, 71.5 dB
    unet = _input_shapes(out / "unet" / "model.onnx")
    assert unet["sample"][0] == 2 and all(isinstance(d, int) for d in unet["sample"])  # a guided pair per call
    assert _input_shapes(out / "vae_decoder" / "model.onnx")["latent_sample"][0] == 1
    assert result["qnn"]["onnxruntime_qnn"] == "2.7.0" and result["qnn"]["htp_arch"] == "79"


def test_context_binaries_open_without_the_source_graph(qnn_fp16):
    from toolchain.runtime.qnn import htp_session

    out, result = qnn_fp16
    for name, files in result["files"].items():
        context = out / files["context_path"]
        assert context.is_file() and files["context_bytes"] > context.stat().st_size  # the .bin beside it
        assert list(context.parent.glob("model_ctx*.bin")), name
    session = htp_session(out / "vae_decoder" / "model_ctx.onnx", fp16=True)
    latent = np.zeros(session.get_inputs()[0].shape, np.float32)
    assert np.isfinite(session.run(None, {"latent_sample": latent})[0]).all()


def test_the_pipeline_samples_through_the_htp(qnn_fp16):
    out, result = qnn_fp16
    htp = OrtPipeline(out, FILES, open_session=htp_opener("SM8750", set(result["qnn"]["fp16_components"])))
    assert htp.max_prompts == 1 and htp.provider == "QNNExecutionProvider"
    images = htp(PROMPTS, 0, steps=3)
    cpu = OrtPipeline(out, FILES)(PROMPTS, 0, steps=3)  # the same fixed-shape graphs on the CPU provider
    assert images.shape == cpu.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    assert float(np.abs(images - cpu).mean()) < 0.05, float(np.abs(images - cpu).mean())


def test_w8a16_unet_is_quantized_and_compared_with_its_cpu_simulation(tiny_onnx, tmp_path):
    calibration = collect_unet_calibration(tiny_onnx, PROMPTS, steps=4, seed=0, n=4, threads=1)
    held_out = collect_unet_calibration(tiny_onnx, PROMPTS, steps=4, seed=1, n=3, threads=1)[1]
    result = prepare_qnn_folder(
        tiny_onnx, tmp_path / "q", "w8a16", calibration, held_out, context_binaries=False,
        psnr_floors_db=TINY_FLOORS, progress=False,
    )  # fmt: skip
    (unet,) = [r for r in result["parity"] if r["component"] == "unet"]
    assert unet["format"] == "qnn-w8a16" and np.isfinite(unet["htp_vs_cpu_psnr_db"])
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "unet" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "context_path" not in result["files"]["unet"]


def test_parity_gate_and_bad_input(tiny_onnx, tmp_path):
    with pytest.raises(ParityError, match="QNN HTP backend"):
        prepare_qnn_folder(tiny_onnx, tmp_path / "a", "fp16", psnr_floors_db={"fp16": 200.0}, progress=False)
    for kwargs, match in (
        ({"precision": "w4a4"}, "precision"),
        ({"precision": "fp16", "soc": "SM0000"}, "SoC"),
        ({"precision": "w8a16"}, "calibration"),
    ):
        with pytest.raises(ValueError, match=match):
            prepare_qnn_folder(tiny_onnx, tmp_path / "b", progress=False, **kwargs)
        assert not (tmp_path / "b").exists()


def test_guided_pairs_keep_each_prompt_with_its_unconditional_row():
    feed = {"sample": np.arange(4)[:, None], "timestep": np.array(3.0)}  # rows: u0 u1 c0 c1
    pairs = guided_pairs(feed)
    assert [p["sample"].ravel().tolist() for p in pairs] == [[0, 2], [1, 3]]
    assert [p["sample"].ravel().tolist() for p in guided_pairs(feed, rows=1)] == [[2], [3]]


def test_stage_records_guidance_through_the_htp(tiny_onnx, tmp_path):
    from toolchain.stages import qnn as stage

    ctx = SimpleNamespace(out_dir=tmp_path / "stage", progress=False)
    ctx.out_dir.mkdir()
    quantize = QuantizeConfig(calibration_text=PROMPTS, calibration_prompts=2, calibration_steps=4)
    settings = QnnSettings(QnnConfig(psnr_floor_db=TINY_FLOORS, context_binaries=False), quantize, [])
    artifact = stage.run(Artifact(path=tiny_onnx, kind="onnx"), settings, ctx)
    assert artifact.kind == "qnn" and artifact.records["htp_images"] == 4
    (row,) = artifact.metrics["guidance"]
    assert row["runtime"] == "QNN HTP (simulator on x86)" and row["format"] == "qnn-fp16"
    assert row["cosine"] >= 0.98 and row["images"] > 0
    assert json.loads((ctx.out_dir / "model_index.json").read_text())  # the pipeline files travel along
    usability = artifact.metrics["usability"]
    assert {(r["component"], r["execution_provider"]) for r in usability} == {
        (c, ep) for c in ("text_encoder", "unet", "vae_decoder") for ep in ("NNAPI", "CoreML (ML Program)", "QNN (HTP)")
    }
    # the QNN EP's own assignment: every node of the qnn graphs on the HTP
    assert all(
        r["partitions"] == 1 and r["coverage"] == 1.0 for r in usability if r["execution_provider"] == "QNN (HTP)"
    )


def test_cli_refuses_bad_qnn_settings_before_any_work(tiny_sd_dir, tmp_path, capsys):
    from ..conftest import run

    assert run(tiny_sd_dir, tmp_path / "a", "--target", "qnn", "quantize.enabled=true") == 2
    assert "qnn.precision" in capsys.readouterr().err
    assert run(tiny_sd_dir, tmp_path / "b", "--target", "qnn", "qnn.soc=SM0000") == 2
    assert "unknown SoC" in capsys.readouterr().err
    assert run(tiny_sd_dir, tmp_path / "c", "--target", "qnn", "qnn.htp_images=0") == 2
    assert not any((tmp_path / name).exists() for name in "abc")


def test_benchmark_draws_its_share_through_the_htp(qnn_fp16, monkeypatch):
    """The benchmark stage's HTP share: `htp_images` images of the erased concept's prompt, judged,
    with the judge's agreement against the same seeds on the CPU provider; report.md renders it."""
    from types import SimpleNamespace as NS

    from benchmarks import leakage
    from benchmarks.report import render_markdown
    from toolchain.stages.benchmark import _htp_share

    class Seven:
        name, classes = "seven", tuple("0123456789")

        def __init__(self):
            self.calls = []

        def classify(self, images):
            self.calls.append(len(images))
            return NS(labels=np.full(len(images), "7"), probs=np.ones((len(images), 1)))

    judge = Seven()
    monkeypatch.setitem(leakage._JUDGES, "test-seven", lambda: judge)
    out, result = qnn_fp16
    artifact = Artifact(path=out, kind="qnn", records={**result["qnn"], "htp_images": 2})
    evaluation = {"judge": "test-seven", "options": {}, "erase": {"7": ["a photo"]}}
    share = _htp_share(artifact, FILES, evaluation, NS(seed=0, eval_steps=1, guidance_scale=5.0))
    assert share["leakage"] == {"7": 1.0} and share["leakage_n"] == {"7": 2} and judge.calls == [2, 2]
    assert share["agreement"] == share["concept_agreement"] == {"7": 1.0}
    text = render_markdown({"stages": [{"name": "qnn", "htp": share}]})
    assert "## Through the QNN HTP backend" in text and "| qnn | 7 | 2 |" in text


def test_snapdragon_profile_draws_the_bulk_through_the_htp(qnn_fp16):
    """Under the snapdragon-htp profile the benchmark opens a QNN deliverable on the HTP backend for
    every image (no CPU stand-in); under desktop-cpu on ONNX Runtime's CPU provider plus the HTP share;
    the profile refuses a deliverable it cannot run."""
    from toolchain.config import ConfigError
    from toolchain.device_config import load_device_profile
    from toolchain.stages.benchmark import _Bench, _opener

    out, result = qnn_fp16
    artifact = Artifact(path=out, kind="qnn", records=result["qnn"])
    benches = {
        name: _Bench(None, load_device_profile(name), ["CPUExecutionProvider"], 0, "cpu", None)
        for name in ("snapdragon-htp", "desktop-cpu")
    }
    assert _opener(artifact, benches["desktop-cpu"]) is None
    htp = OrtPipeline(out, FILES, open_session=_opener(artifact, benches["snapdragon-htp"]))
    assert htp.provider == "QNNExecutionProvider" and htp.max_prompts == 1
    with pytest.raises(ConfigError, match="--target qnn"):
        benches["snapdragon-htp"].device.check_deliverable("onnx")
