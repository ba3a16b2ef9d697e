"""The SD-1.5 chain study's own arithmetic and refusals; the whole study on a tiny SD-1.x-layout UNet (slow)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest

from benchmarks.studies import chain_sd15


def _timing(unet_speedups: dict[str, float], a_ms=1000.0, vae_ms=500.0, tiny_ms=20.0) -> dict:
    unet = {row: {"ms": a_ms / x, "a_ms": a_ms, "speedup": x, "repeats": 3} for row, x in unet_speedups.items()}
    unet["a"] = {"ms": a_ms, "a_ms": a_ms, "speedup": 1.0, "repeats": 15}
    return {
        "unet": unet,
        "decoder": {"vae": {"median_ms": vae_ms, "repeats": 3}, "tiny": {"median_ms": tiny_ms, "repeats": 3}},
        "text_encoder": {"2": {"median_ms": 10.0}, "1": {"median_ms": 6.0}},
    }


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        chain_sd15.main(["--help"])
    assert exit_info.value.code == 0
    assert "--dplus-ratio" in capsys.readouterr().out
    for bad in (["--threads", "0"], ["--dplus-ratio", "1.0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            chain_sd15.main(bad)
        assert exit_info.value.code == 2


def test_per_image_composition():
    """Guided rows: text encoder at batch 2 + 25 UNet calls + VAE; (e): batch 1, one call, VAE;
    (f): (e)'s UNet with the tiny decoder."""
    timing = _timing({"b": 1.2, "c": 3.0, "d": 4.0, "d+": 5.0, "e": 10.0})
    assert chain_sd15.composed_ms("a", timing) == pytest.approx(10 + 25 * 1000 + 500)
    assert chain_sd15.composed_ms("d", timing) == pytest.approx(10 + 25 * 250 + 500)
    assert chain_sd15.composed_ms("e", timing) == pytest.approx(6 + 100 + 500)
    assert chain_sd15.composed_ms("f", timing) == pytest.approx(6 + 100 + 20)


def test_verdicts_say_met_or_not_as_measured():
    rows = {
        "f": {"image_composed_speedup": 60.0, "image_measured_speedup": 49.9, "size_ratio": 0.15},
        "d+": {"unet_speedup": 4.99},
    }
    v = chain_sd15.verdicts(rows)
    assert v["f_speedup_composed"]["met"] and not v["f_speedup_measured"]["met"]
    assert v["f_size_ratio"]["met"] and not v["dplus_unet_speedup"]["met"]


def test_row_folders_name_the_dplus_ratio(tmp_path):
    args = type("A", (), {"work": tmp_path, "dplus_ratio": 0.6})()
    folders = chain_sd15.row_folders(args)
    assert folders["a"] == tmp_path / "a" and folders["d"] == tmp_path / "d"
    assert {folders[r].name for r in ("d+", "e", "f")} == {"d+-0.6", "e-0.6", "f-0.6"}


@pytest.mark.slow
def test_whole_chain_on_a_tiny_unet(tmp_path, monkeypatch):
    """Every row built by the project's exporter, quantizer, pruner and decoder code, timed, one image
    each in a fresh process; the table's ratios follow from its own figures."""
    config = json.loads((chain_sd15.Path(__file__).parents[2] / "configs/models/sd15-unet.json").read_text())
    config.update(block_out_channels=[64, 64, 64, 64], layers_per_block=1, sample_size=16, _diffusers_version="0.39.0")
    (tmp_path / "unet.json").write_text(json.dumps(config))
    # SD's VAE layout at half its widths: still wider than the tiny decoder it is compared with
    vae = {"_class_name": "AutoencoderKL", "block_out_channels": [64, 128, 256, 256], "latent_channels": 4,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
           "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 128}  # fmt: skip
    (tmp_path / "vae.json").write_text(json.dumps(vae))
    out = tmp_path / "out" / "chain"
    argv = ["--unet-config", str(tmp_path / "unet.json"), "--vae-config", str(tmp_path / "vae.json"), "--threads", "1"]
    argv += ["--rounds", "1", "--calibration-steps", "2", "--calibration-feeds", "2", "--work", str(tmp_path / "w")]
    assert chain_sd15.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert list(rows) == list(chain_sd15.ROWS)
    assert rows["c"]["macs_per_image"] < rows["a"]["macs_per_image"]
    assert rows["d+"]["macs_per_image"] < rows["a"]["macs_per_image"]
    assert rows["b"]["size_bytes"] < rows["a"]["size_bytes"] and rows["d"]["size_bytes"] < rows["c"]["size_bytes"]
    assert rows["e"]["macs_per_image"] < rows["d+"]["macs_per_image"]
    assert rows["f"]["macs_per_image"] < rows["e"]["macs_per_image"]
    assert (tmp_path / "w" / "e-0.6" / "onestep.json").is_file()
    assert all(r["peak_rss_bytes"] > 0 and r["image_measured_ms"] > 0 for r in rows.values())
    assert set(result["verdicts"]) == {"f_speedup_composed", "f_speedup_measured", "f_size_ratio", "dplus_unet_speedup"}
    assert "| f |" in out.with_suffix(".md").read_text()
    # a second run at the same (d+) ratio builds no model: every row and its MACs come from the cache
    monkeypatch.setattr(chain_sd15, "source_pipeline", lambda args: pytest.fail("rebuilt a cached chain"))
    args = type("A", (), {"work": tmp_path / "w", "dplus_ratio": 0.6})()
    assert chain_sd15.build(args)["macs"] == result["build"]["macs"]
