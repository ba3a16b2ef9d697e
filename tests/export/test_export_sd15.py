"""The SD-1.5 export benchmark's own parts, on a tiny SD-1.x-layout UNet: arguments, per-phase
memory attribution, and one ONNX export measured in a fresh child process."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import logging
from types import SimpleNamespace

import pytest

from benchmarks.studies import export_sd15


@pytest.fixture
def tiny_unet_config(tmp_path):
    """SD-1.5's config at tiny widths (4 blocks of 32 channels, 8x8 latent); cross-attention dim 768."""
    config = json.loads((export_sd15.ROOT / "configs" / "models" / "sd15-unet.json").read_text())
    # a current version stamp: diffusers raises a pre-0.9 config's sample_size below 64 to 64
    config.update(block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=8, _diffusers_version="0.39.0")
    path = tmp_path / "tiny-unet.json"
    path.write_text(json.dumps(config))
    return path


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_sd15.main(["--help"])
    assert exit_info.value.code == 0
    assert "--targets" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        export_sd15.main(["--targets", "tflite"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        export_sd15.main(["--threads", "0"])


def test_phase_memory_follows_the_exporters_phase_records():
    log = logging.getLogger("export.onnx")
    with export_sd15.PhaseMemory(start_phase="build") as memory:
        log.info("unet: trace ...", extra={"phase": "trace"})
        block = bytearray(64 * 2**20)  # touched: counts in RSS
        log.info("unet: trace done", extra={"phase_done": "trace"})
        del block
    assert set(memory.peaks) >= {"build", "trace", "other"}
    assert memory.peaks["trace"] >= memory.peaks["build"] + 32 * 2**20
    # anonymous memory (a bytearray is) is sampled beside RSS, phase by phase
    assert memory.anon_peaks["trace"] >= memory.anon_peaks["build"] + 32 * 2**20
    assert all(memory.anon_peaks[p] <= memory.peaks[p] for p in memory.peaks)


def test_onnx_export_measured_in_a_child(tiny_unet_config, tmp_path):
    args = SimpleNamespace(config_path=tiny_unet_config, seed=0, threads=1, timeout=600)
    row = export_sd15.run_target("onnx", args, tmp_path / "onnx")
    assert set(row["phases_s"]) == {"trace", "validate"}  # no external data below 2 GiB
    assert row["peak_rss_bytes"] >= row["phase_peak_rss_bytes"]["trace"] > row["runtime_rss_bytes"] > 0
    assert row["tree_peak_rss_bytes"] > 0
    assert row["output_bytes"] > row["output"]["size_bytes"] > 0
    assert row["parity"][0]["max_abs_err"] <= row["parity"][0]["tolerance"]
    assert (tmp_path / "onnx" / "unet" / "model.onnx").is_file()
