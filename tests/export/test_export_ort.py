"""`--target ort`: ORT-format models + required_operators.config, checked against the ONNX ones."""

import json
import os
import shutil
from pathlib import Path

import pytest

from export.ort import OPS_CONFIG, USABILITY_EPS, convert_to_ort
from toolchain import artifact as art

from ..conftest import manifests, run


def test_convert_writes_ort_models_and_operator_config(finished_run, tmp_path):
    onnx_dir = finished_run[0] / "02-export"
    result = convert_to_ort(onnx_dir, tmp_path / "ort", progress=False)
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert (tmp_path / "ort" / component / "model.ort").stat().st_size > 0
        assert not (tmp_path / "ort" / component / "model.onnx").exists()
    ops = (tmp_path / "ort" / OPS_CONFIG).read_text()
    assert "ai.onnx;" in ops and "Conv" in ops and "MatMul" in ops and str(tmp_path) not in ops
    assert all(row["max_abs_err"] <= row["tolerance"] and row["reference"] == "onnx" for row in result["parity"])
    assert (tmp_path / "ort" / "tokenizer" / "vocab.json").is_file()
    assert (tmp_path / "ort" / "model_index.json").is_file()
    usability = {(r["component"], r["execution_provider"]): r for r in result["usability"]}
    providers = [*USABILITY_EPS, "QNN (HTP)"]
    assert set(usability) == {(c, ep) for c in ("text_encoder", "unet", "vae_decoder") for ep in providers}
    unet = usability[("unet", "CoreML (ML Program)")]
    assert unet["partitions"] > 3 and 0 < unet["coverage"] < 0.95  # the dynamic-shape graph: CPU-bound on a phone
    assert unet["nodes_blocked_by_dynamic_shapes"] > 0
    # the figures are the delivered graph's: "Fixed" style bakes in CPU-only fused ops the Core ML EP lacks
    assert any(op.startswith("com.microsoft:") for op in unet["unsupported_ops"])
    assert not list((tmp_path / "ort").rglob("*.onnx"))


def test_convert_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no <component>/model.onnx"):
        convert_to_ort(tmp_path, tmp_path / "out", progress=False)


@pytest.mark.slow  # the default path is test_target_ort_fixes_shapes_for_phone_accelerators (a run each)
def test_target_ort_reuses_the_sealed_onnx_export(finished_run, tiny_sd_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    sealed = manifests(out)
    monkeypatch.setenv("COMPRESS_CACHE", os.environ["COMPRESS_CACHE"])  # --cache-dir sets it: restored after
    # the ort target's own defaults fix the shapes and keep the graphs provider-independent; as the
    # onnx export was made, it is reused
    same_export = ("export.fixed_shapes=false", "export.ort_optimization=Fixed")
    code = run(tiny_sd_dir, out, "--target", "ort", "--cache-dir", str(tmp_path / "cache"), *same_export)
    assert code == 0
    now = manifests(out)
    assert now["01-prune"] == sealed["01-prune"] and now["02-export"] == sealed["02-export"]
    assert art.load(out / "03-ort").kind == "ort" and not (out / "03-benchmark").exists()
    deploy = out / "deploy" / "ort"
    assert (deploy / OPS_CONFIG).is_file() and (deploy / "unet" / "model.ort").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["target"] == "ort"
    assert {"onnxruntime", "ort"} <= {row["runtime"] for row in report["latency"]}
    assert {row["format"] for row in report["parity"]} == {"onnx", "ort"}
    # side by side in the deliverable's own format: the source converted to .ort, cached apart from the run
    side = report["side_by_side"]
    assert side["runtime"] == "ort" and side["deliverable"]["stage"] == "ort"
    source_unet = Path(side["source"]["export_cache"]) / "unet" / "model.ort"
    assert source_unet.is_file() and (tmp_path / "cache") in source_unet.parents


def test_convert_refuses_a_model_past_the_ort_format_limit(finished_run, tmp_path, monkeypatch):
    """One FlatBuffer of at most 2 GiB: an fp32 SD-1.5 UNet (3.4 GB) is refused before anything is
    written, naming the component and the ways to shrink it (the limit lowered to the tiny UNet's size)."""
    import export.ort as ort_export

    onnx_dir = finished_run[0] / "02-export"
    unet_bytes = sum(p.stat().st_size for p in (onnx_dir / "unet").glob("model.onnx*"))
    monkeypatch.setattr(ort_export, "ORT_FORMAT_MAX_BYTES", unet_bytes - 1)
    with pytest.raises(ValueError, match=r"unet .* GiB: an ORT-format model is a single file of at most 2 GiB"):
        convert_to_ort(onnx_dir, tmp_path / "ort", progress=False)
    assert not (tmp_path / "ort").exists()


def test_target_ort_fixes_shapes_for_phone_accelerators(finished_run, tiny_sd_dir, tmp_path, monkeypatch):
    """`--target ort` as shipped: the export fixed to a guided pair and folded, the .ort files saved
    with "Runtime" optimisations, so the delivered UNet goes to the Core ML EP whole and to QNN whole;
    the side by side times a source fixed the same way."""
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    sealed = manifests(out)
    monkeypatch.setenv("COMPRESS_CACHE", os.environ["COMPRESS_CACHE"])
    assert run(tiny_sd_dir, out, "--target", "ort", "--cache-dir", str(tmp_path / "cache")) == 0
    now = manifests(out)
    assert now["01-prune"] == sealed["01-prune"] and now["02-export"] != sealed["02-export"]
    export = art.load(out / "02-export")
    assert export.records["fixed_shapes"]["batches"] == {"text_encoder": 2, "unet": 2, "vae_decoder": 1}
    assert art.load(out / "03-ort").records["optimization_style"] == "Runtime"
    deploy = out / "deploy" / "ort"
    assert (deploy / "unet" / "model.ort").is_file() and (deploy / OPS_CONFIG).is_file()
    assert (deploy / "fixed_shapes.json").is_file() and not list(deploy.rglob("*with_runtime_opt*"))
    report = json.loads((out / "report.json").read_text())
    assert report["fixed_shapes"]["inputs"]["unet"]["sample"][0] == 2
    assert {"onnx-fixed", "onnx", "ort"} <= {row["format"] for row in report["parity"]}
    delivered = {(r["component"], r["execution_provider"]): r for r in report["usability"] if r["stage"] == "ort"}
    coreml, qnn = delivered[("unet", "CoreML (ML Program)")], delivered[("unet", "QNN (HTP)")]
    assert coreml["coverage"] >= 0.99 and coreml["unsupported_ops"] == [] and coreml["partitions"] <= 3
    assert coreml.get("partitions_absent_inputs_accepted", coreml["partitions"]) == 1
    assert qnn["partitions"] == 1 and qnn["coverage"] == 1.0
    side = report["side_by_side"]
    assert (Path(side["source"]["export_cache"]) / "fixed_shapes.json").is_file()
    assert {row["batch"] for row in side["rows"] if row["component"] == "unet"} == {2}
    card = (out / "deploy" / "ort" / "README.md").read_text()
    assert "Shapes are fixed" in card and "--minimal_build extended" in card
