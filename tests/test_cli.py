"""`compress` end to end on the tiny model, in process: outputs, skip on re-run, bad input."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from toolchain import artifact as art
from toolchain.cli import main
from toolchain.runfolder import MARKER, RunFolder, RunLock

from .conftest import manifests, run


def test_end_to_end_outputs(finished_run):
    out, _ = finished_run
    deploy = out / "deploy" / "onnx"
    for rel in (
        "model_index.json",
        "text_encoder/model.onnx",
        "unet/model.onnx",
        "vae_decoder/model.onnx",
        "tokenizer/vocab.json",
        "scheduler/scheduler_config.json",
        "report.json",
    ):
        assert (deploy / rel).is_file(), rel
    assert not list(out.glob("*.partial")) and not (deploy / "manifest.json").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["model"]["target"] == "onnx"
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["source", "prune", "export"]
    # 30% of channels removed -> roughly half the UNet parameters remain
    ratio = stages["prune"]["unet_params"] / stages["source"]["unet_params"]
    assert 0.35 < ratio < 0.7, ratio
    assert stages["export"]["unet_params"] == pytest.approx(stages["prune"]["unet_params"], rel=0.01)
    assert all(s["size_bytes"] > 0 for s in stages.values())
    runtimes = {(row["runtime"], row["stage"], row["component"]) for row in report["latency"]}
    assert {("torch", "source", "unet"), ("torch", "prune", "unet"), ("onnxruntime", "export", "unet")} <= runtimes
    assert all(row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] for row in report["latency"])
    parity = {row["component"]: row for row in report["parity"]}
    assert set(parity) == {"text_encoder", "unet", "vae_decoder"}
    assert all(row["max_abs_err"] <= row["tolerance"] and row["reference"] == "torch" for row in parity.values())
    assert (out / "report.md").read_text().startswith("# diffusion-compress report")


def test_rerun_skips_every_stage_and_changes_nothing(finished_run, tiny_sd_dir):
    out, first_s = finished_run
    sealed = manifests(out)
    onnx_bytes = (out / "deploy/onnx/unet/model.onnx").read_bytes()
    start = time.perf_counter()
    assert run(tiny_sd_dir, out) == 0
    rerun_s = time.perf_counter() - start
    assert manifests(out) == sealed, "a re-run must skip sealed stages"
    assert (out / "deploy/onnx/unet/model.onnx").read_bytes() == onnx_bytes
    assert rerun_s < 0.25 * first_s, (rerun_s, first_s)  # the product target is 10%; timing noise allowance


def test_from_stage_and_changed_setting_rerun_only_what_follows(finished_run, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    sealed = manifests(out)
    assert run(tiny_sd_dir, out, "--from-stage", "benchmark") == 0
    now = manifests(out)
    assert now["01-prune"] == sealed["01-prune"] and now["02-export"] == sealed["02-export"]
    assert now["03-benchmark"] != sealed["03-benchmark"]
    assert run(tiny_sd_dir, out, "prune.ratio=0.5") == 0
    now2 = manifests(out)
    assert all(now2[k] != now[k] for k in ("01-prune", "02-export", "03-benchmark"))
    assert now2["00-source"] == now["00-source"]
    assert art.load(out / "01-prune").records["pruning"]["ratio"] == 0.5
    assert run(tiny_sd_dir, out, "prune.ratio=0.5", "--force") == 0
    now3 = manifests(out)
    assert all(now3[k] != now2[k] for k in now3 if k != "00-source"), "--force re-runs every stage"


def test_bench_remeasures_a_finished_run(finished_run, capsys):
    assert main(["bench", str(finished_run[0])]) == 0
    text = capsys.readouterr().out
    assert "## Latency" in text and "onnxruntime" in text and "| prune |" in text
    assert main(["bench", str(finished_run[0].parent)]) == 2


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys):
    code = main(["--target", "onnx", "--model", "someorg/some-model", "--out", str(tmp_path / "o"), "-q"])
    assert code == 2 and "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dry_run_prints_plan_and_touches_nothing(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_sd_dir, out, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "01-prune" in text and "02-export" in text and "03-benchmark" in text and "ratio=0.3" in text
    assert not out.exists()


def test_erase_then_overrides_and_concept_prune_plan(tiny_sd_dir, tmp_path, capsys):
    assert run(tiny_sd_dir, tmp_path / "o", "--dry-run", "--erase", "7", "concept_prune.enabled=true") == 0
    text = capsys.readouterr().out
    assert "erase   7" in text and "02-concept_prune" in text and "03-export" in text
    assert run(tiny_sd_dir, tmp_path / "o", "--dry-run", "concept_prune.enabled=true") == 2
    assert "needs a concept to erase" in capsys.readouterr().err


def test_dry_run_reports_sealed_stages(finished_run, tiny_sd_dir, capsys):
    assert run(tiny_sd_dir, finished_run[0], "--dry-run") == 0
    assert capsys.readouterr().out.count("skip: sealed") == 3


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_by_permission(tiny_sd_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run(tiny_sd_dir, locked / "out") == 2
    assert "not writable" in capsys.readouterr().err


def test_second_writer_is_refused(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    RunFolder(out).create()
    with RunLock(out):
        assert run(tiny_sd_dir, out) == 2
    assert "another compress run" in capsys.readouterr().err
    assert not list(out.glob("[0-9][0-9]-*"))


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--erase" in text and "exit codes" in text


def test_validate_command(capsys, tmp_path):
    from toolchain.config import CONFIG_DIR

    assert main(["validate", str(CONFIG_DIR / "recipes" / "default.yaml")]) == 0
    bad = tmp_path / "recipes" / "bad.yaml"
    bad.parent.mkdir()
    bad.write_text("prune:\n  ratio: 2\n")
    assert main(["validate", str(bad)]) == 2
    assert "prune.ratio=2.0" in capsys.readouterr().err


def test_target_coreml_reuses_the_sealed_prune(finished_run, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    sealed = manifests(out)
    assert run(tiny_sd_dir, out, "--target", "coreml", "coreml.compression=int8") == 0
    assert manifests(out)["01-prune"] == sealed["01-prune"]
    assert not (out / "02-export").exists() and art.load(out / "02-coreml").kind == "coreml"
    deploy = out / "deploy" / "coreml"
    for name in ("TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage", "vocab.json", "merges.txt"):
        assert (deploy / name).exists(), name
    spec = art.load(out / "02-coreml").metrics["spec"]["unet"]
    assert spec["model_type"] == "mlProgram" and any(op.startswith("constexpr_") for op in spec["ops"])
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["target"] == "coreml"
    assert any("macOS" in w for w in report["warnings"]) == (sys.platform != "darwin")


def test_failed_parity_gate_exits_1_with_the_numbers(finished_run, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    before = manifests(out)
    assert run(tiny_sd_dir, out, "export.tolerance={unet: 0.0}") == 1
    err = capsys.readouterr().err
    assert "gate failed: unet:" in err and "over the tolerance 0" in err
    assert manifests(out)["02-export"] == before["02-export"], "a failed gate seals nothing"
    assert (out / "02-export.partial").is_dir()
    assert not (out / "deploy" / "onnx").exists() and not (out / "report.json").exists(), "no stale deliverable"


def test_quantize_stage_follows_the_sealed_export(finished_run, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    sealed = manifests(out)
    # uint8 activations crush the random tiny UNet's guidance signal (test_guidance.py): floors stated
    floors = ("quantize.guidance_cosine_floor=0", "quantize.guidance_norm_ratio=[0.1,10]")
    assert run(tiny_sd_dir, out, "quantize.enabled=true", "quantize.calibration_prompts=2", *floors) == 0
    now = manifests(out)
    assert now["02-export"] == sealed["02-export"] and art.load(out / "03-quantize").kind == "onnx"
    int8 = (out / "deploy/onnx/unet/model.onnx").stat().st_size
    fp32 = (out / "02-export/unet/model.onnx").stat().st_size
    assert int8 < 0.75 * fp32, (int8, fp32)  # Conv+MatMul weights int8; 0.61 measured on the tiny UNet
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["source", "prune", "export", "quantize"]
    assert {row["stage"] for row in report["latency"] if row["runtime"] == "onnxruntime"} == {"export", "quantize"}
    (guidance,) = report["guidance"]
    assert (guidance["format"], guidance["cosine_floor"], guidance["norm_ratio_range"]) == (
        "onnx-int8",
        0.0,
        [0.1, 10.0],
    )
    assert "## Guidance fidelity" in (out / "report.md").read_text()


def test_quantize_for_coreml_is_refused(tiny_sd_dir, tmp_path, capsys):
    assert run(tiny_sd_dir, tmp_path / "o", "--target", "coreml", "quantize.enabled=true") == 2
    assert "coreml.compression" in capsys.readouterr().err


def _inodes(folder: Path) -> set[int]:
    return {p.stat().st_ino for p in folder.rglob("*") if p.is_file()}


def test_run_shares_no_file_with_the_input_model(finished_run, tiny_sd_dir):
    """Hard links would let an edit of a run file edit the user's model: files are cloned or copied."""
    out, _ = finished_run
    assert (out / "01-prune/text_encoder/model.safetensors").is_file()
    assert not _inodes(tiny_sd_dir) & _inodes(out)


def test_same_inputs_give_byte_identical_deliverables(finished_run, tiny_sd_dir, tmp_path):
    """Two runs in different folders: every deployed model file is identical and carries no path of
    the build machine. The report and model card beside them are measurements (timings), left out."""
    first = finished_run[0] / "deploy" / "onnx"
    out = tmp_path / "elsewhere"
    assert run(tiny_sd_dir, out) == 0
    second = out / "deploy" / "onnx"
    measured = {"report.json", "report.md", "README.md"}  # the model card quotes the report's timings

    def files(root):
        return {
            str(p.relative_to(root)): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and p.name not in measured and p.suffix != ".png"
        }

    a, b = files(first), files(second)
    assert a.keys() == b.keys() and "model_index.json" in a
    assert [k for k in a if a[k] != b[k]] == []
    for root, content in ((finished_run[0], a), (out, b)):
        for name, data in content.items():
            assert str(root).encode() not in data and str(tiny_sd_dir).encode() not in data, name


def test_foreign_entries_in_a_run_folder_are_never_removed(finished_run, tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run[0], out)
    (out / "01-family-photos").mkdir()
    (out / "01-family-photos" / "beach.jpg").write_bytes(b"jpeg")
    # a changed plan (coreml) drops 02-export: only compress's own folders may go
    assert run(tiny_sd_dir, out, "--target", "coreml") == 0
    assert (out / "01-family-photos" / "beach.jpg").read_bytes() == b"jpeg"
    assert not (out / "02-export").exists() and (out / "02-coreml").is_dir()
    # a file of the user's inside the deliverable this run would replace: refused, kept
    (out / "deploy" / "onnx").mkdir(parents=True, exist_ok=True)
    (out / "deploy" / "onnx" / "mine.txt").write_text("mine")
    before = manifests(out)
    capsys.readouterr()
    assert run(tiny_sd_dir, out) == 2
    err = capsys.readouterr().err
    assert "deploy/onnx was not written by compress" in err and len(err.strip().splitlines()) == 1
    assert (out / "deploy" / "onnx" / "mine.txt").read_text() == "mine" and manifests(out) == before


def test_run_folder_carries_the_marker(finished_run):
    created = json.loads((finished_run[0] / MARKER).read_text())["created"]
    assert {"00-source", "01-prune", "02-export", "03-benchmark", "deploy/onnx", "report.json"} <= set(created)
    assert "deploy/onnx/unet/model.onnx" in created


def test_diverged_training_exits_3_in_one_line(tiny_sd_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(
        tiny_sd_dir,
        out,
        "finetune.enabled=true",
        "finetune.mode=distill",
        "finetune.steps=4",
        "finetune.max_loss=1e-9",
        "finetune.samples_per_prompt=1",
        "finetune.sample_steps=2",
    )
    err = capsys.readouterr().err.strip()
    assert code == 3, err
    assert err.startswith("compress: training diverged: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert (out / "01-prune" / art.MANIFEST).is_file(), "stages sealed before the divergence are kept"


def test_files_are_hard_linked_only_within_one_run_folder(tmp_path):
    """Sealed artifacts of one run share files; another run's files and the input are copied."""
    from toolchain.models.io import link_or_copy

    for name in ("run-a", "run-b"):
        RunFolder(tmp_path / name).create()
    source = tmp_path / "run-a" / "01-prune" / "weights.bin"
    source.parent.mkdir()
    source.write_bytes(b"weights")
    link_or_copy(source, tmp_path / "run-a" / "02-finetune" / "weights.bin")
    link_or_copy(source, tmp_path / "run-b" / "01-prune" / "weights.bin")
    link_or_copy(source, tmp_path / "elsewhere" / "weights.bin")
    inode = source.stat().st_ino
    assert (tmp_path / "run-a" / "02-finetune" / "weights.bin").stat().st_ino == inode
    assert (tmp_path / "run-b" / "01-prune" / "weights.bin").stat().st_ino != inode
    assert (tmp_path / "elsewhere" / "weights.bin").read_bytes() == b"weights"
