"""The benchmark harness: latency and memory records, device profiles, plots, the regression
gate and the device tests' clean skip, on the tiny pipeline's finished run."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolchain.config import CONFIG_DIR, ConfigError

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _benchmark_dir(run_dir: Path) -> Path:
    return next(run_dir.glob("[0-9][0-9]-benchmark"))


def test_latency_records(finished_run):
    report = _report(finished_run[0])
    assert report["device_profile"]["name"] == "desktop-cpu"
    rows = report["latency"]
    for row in rows:
        for key in ("runtime", "profile", "emulated", "component", "batch", "median_ms", "provider"):
            assert key in row, f"latency row without {key}: {row}"
        assert row["profile"] == "desktop-cpu" and row["emulated"] is False
        assert 0 < row["median_ms"] < 60_000
        assert row["p90_ms"] >= row["median_ms"]
    exported = [r for r in rows if r["runtime"] == "onnxruntime" and r["component"] != "image"]
    assert {r["component"] for r in exported} == {"text_encoder", "unet", "vae_decoder"}
    assert all(r["provider"] == "CPUExecutionProvider" and r["load_ms"] > 0 for r in exported)
    images = {r["method"]: r for r in rows if r["component"] == "image"}
    assert set(images) == {"composed", "measured"}
    unet = next(r for r in exported if r["component"] == "unet")
    steps = images["measured"]["steps"]
    assert steps == images["composed"]["steps"] >= 1 and unet["batch"] == 2
    assert images["composed"]["median_ms"] > steps * unet["median_ms"]
    assert images["measured"]["load_ms"] > 0
    # the end-to-end image is the composed sum plus Python's DDIM math: same order of magnitude
    assert images["composed"]["median_ms"] / 5 < images["measured"]["median_ms"] < images["composed"]["median_ms"] * 20


def test_memory_records(finished_run):
    memory = _report(finished_run[0])["memory"]
    assert {m["component"] for m in memory} == {"text_encoder", "unet", "vae_decoder", "image"}
    for row in memory:
        for key in ("runtime", "profile", "emulated", "component", "peak_rss_bytes", "provider"):
            assert key in row, f"memory row without {key}: {row}"
        # a fresh process with onnxruntime: tens of MiB at least, and nowhere near the pytest process
        assert 20 * 2**20 < row["peak_rss_bytes"] < 4 * 2**30
        assert row["runtime_rss_bytes"] <= row["peak_rss_bytes"]
        assert "over_budget" not in row  # desktop-cpu has no budget


def test_small_memory_budget_flags_the_run(finished_run, tmp_path, capsys):
    from toolchain.cli import main

    profile = tmp_path / "tiny-phone.yaml"
    profile.write_text(
        "# a phone with almost no memory, for this test\n"
        "description: test phone\nthreads: 1\nmemory_budget_bytes: 1000000\n"
        "providers: [XnnpackExecutionProvider, CPUExecutionProvider]\nemulated: true\n"
    )
    assert main(["bench", str(finished_run[0]), "--profile", str(profile), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["over_budget"] is True
    assert report["memory"] and all(m["over_budget"] and m["memory_budget_bytes"] == 1000000 for m in report["memory"])
    assert any("exceeds the tiny-phone budget" in w for w in report["warnings"])
    assert any("XnnpackExecutionProvider" in w for w in report["warnings"])  # not in a desktop wheel: stated
    assert all(r["profile"] == "tiny-phone" and r["emulated"] is True for r in report["latency"] + report["memory"])
    assert report["device_profile"]["threads_used"] == 1


def test_bench_one_stage_one_runtime(finished_run, capsys):
    """`compress bench RUN/NN-stage --runtime R`: that stage and its ancestors, only runtime R."""
    from toolchain.cli import main

    export = next(finished_run[0].glob("[0-9][0-9]-export"))
    assert main(["bench", str(export), "--runtime", "onnxruntime", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stages"][-1]["name"] == "export"
    assert report["latency"] and {r["runtime"] for r in report["latency"]} == {"onnxruntime"}
    prune = next(finished_run[0].glob("[0-9][0-9]-prune"))
    assert main(["bench", str(prune), "--runtime", "torch", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["stages"]] == ["source", "prune"]
    assert {r["runtime"] for r in report["latency"]} == {"torch"} and not report["memory"]
    assert main(["bench", str(finished_run[0]), "--runtime", "coreml"]) == 2
    assert "only on macOS" in capsys.readouterr().err


def test_gate_passes_on_baseline_and_fails_on_doctored_report(finished_run, tmp_path, capsys):
    from toolchain.cli import main

    report_path = finished_run[0] / "report.json"
    assert main(["bench", str(report_path), "--baseline", str(report_path)]) == 0
    assert "no regression" in capsys.readouterr().out

    worse = _report(finished_run[0])
    next(r for r in worse["side_by_side"]["rows"] if r.get("method") == "measured")["speedup"] /= 2
    next(r for r in worse["latency"] if r["component"] == "unet" and r["runtime"] == "onnxruntime")["median_ms"] *= 3
    worse["stages"][-1]["size_bytes"] = int(worse["stages"][-1]["size_bytes"] * 1.2)
    worse["parity"][0]["max_abs_err"] = worse["parity"][0]["tolerance"] * 10
    doctored = tmp_path / "worse.json"
    doctored.write_text(json.dumps(worse))
    assert main(["bench", str(doctored), "--baseline", str(report_path)]) == 1
    table = capsys.readouterr().out
    assert table.count("REGRESSION") == 3 and "metric" in table and "limit" in table
    assert "speedup onnxruntime/image/1/measured" in table
    # absolute latency is gated only where asked (a quiet machine); a looser tolerance lets the speed-up
    # through; bad input is exit 2, not a gate failure
    assert main(["bench", str(doctored), "--baseline", str(report_path), "--absolute-latency"]) == 1
    assert capsys.readouterr().out.count("REGRESSION") == 4
    assert main(["bench", str(doctored), "--baseline", str(report_path), "--tolerance", "speedup_ratio=2.5"]) == 1
    assert capsys.readouterr().out.count("REGRESSION") == 2
    assert main(["bench", str(doctored), "--baseline", str(report_path), "--tolerance", "speed=2"]) == 2
    assert main(["bench", str(doctored), "--baseline", str(tmp_path / "missing.json")]) == 2


def test_gate_on_committed_baseline():
    from benchmarks.regress import compare

    baseline = json.loads((REPO / "benchmarks" / "results" / "baseline-default.json").read_text())
    assert compare(baseline, baseline) == []
    worse = copy.deepcopy(baseline)
    judged = next(s for s in worse["stages"] if s.get("retain_accuracy") is not None)
    judged["retain_accuracy"] -= 0.05  # 5 points > 3
    judged["fid"] += 1.0
    worse["memory"][0]["peak_rss_bytes"] *= 2
    failed = {r.metric.split()[0] for r in compare(worse, baseline)}
    assert failed == {"retain_accuracy", "fid", "memory"}


def test_gate_compares_speed_only_on_the_same_machine():
    """On the committed baseline: a deliverable 3x slower against its source fails as a speed-up;
    3x slower absolute times fail only with absolute_latency; on another CPU neither compares."""
    from benchmarks.regress import Tolerances, check_all, compare

    baseline = json.loads((REPO / "benchmarks" / "results" / "baseline-default.json").read_text())
    assert baseline["machine"]["cores"] >= 1 and baseline["side_by_side"]["rows"]
    slower = copy.deepcopy(baseline)
    for row in slower["latency"]:
        row["median_ms"] *= 3
    for row in slower["side_by_side"]["rows"]:
        row["speedup"] /= 3
    assert {r.metric.split()[0] for r in compare(slower, baseline)} == {"speedup"}
    assert {r.metric.split()[0] for r in compare(slower, baseline, absolute_latency=True)} == {"speedup", "latency"}
    jitter = copy.deepcopy(baseline)  # a sub-millisecond row 1.6x slower is within the 1 ms allowance
    fast = next(r for r in jitter["latency"] if r["median_ms"] < 1.0)
    fast["median_ms"] *= 1.6
    assert compare(jitter, baseline, absolute_latency=True) == []
    slower["machine"] = {**baseline["machine"], "cpu": "another CPU"}
    rows = [r for r in check_all(slower, baseline, Tolerances(), absolute_latency=True) if "latency" in r.metric]
    assert rows and all(r.verdict == "other machine" and not r.failed for r in rows)
    assert compare(slower, baseline, absolute_latency=True) == []


def test_plots_are_pngs(finished_run, tmp_path):
    from PIL import Image

    from benchmarks.plots import quality_plot, sample_grid

    report = _report(finished_run[0])
    assert "latency.png" in report["plots"]
    stages = [
        {"name": "source", "leakage": {"7": 0.9}, "retain_accuracy": 1.0},
        {"name": "prune", "leakage": {"7": 0.4}, "retain_accuracy": 0.8},
    ]
    rng = __import__("numpy").random.default_rng(0)
    samples = {
        s["name"]: [
            {"label": lab, "erased": lab == "7", "prompt": lab, "image": rng.random((16, 16, 3))} for lab in "71"
        ]
        for s in stages
    }
    paths = [_benchmark_dir(finished_run[0]) / name for name in report["plots"]]
    paths += [quality_plot(stages, tmp_path / "quality.png"), sample_grid(samples, tmp_path / "samples.png")]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 50
    assert (
        "![latency per runtime and component](latency.png)"
        in (_benchmark_dir(finished_run[0]) / "report.md").read_text()
    )


def test_device_tests_skip_cleanly_and_are_not_collected_by_default():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert config["testpaths"] == ["tests"]  # a plain `pytest` never collects device_tests/
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "device_tests", "-q", "-p", "no:cacheprovider", "-n", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout and "failed" not in result.stdout and "error" not in result.stdout.lower()


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "devices").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_device_profiles_validate(path):
    from toolchain.device_config import load_device_profile

    text = path.read_text()
    assert text.startswith("#") and "Run:" in text.split("\n\n")[0], (
        f"{path.name}: start with what it is and its command"
    )
    profile = load_device_profile(str(path))
    assert profile.name == path.stem and profile.fallback_provider == "CPUExecutionProvider"
    # a phone's profile names the phone runtime it runs through: none is a thread count alone
    assert profile.emulated == (profile.runtime != "onnxruntime")
    if profile.emulated:
        assert profile.memory_budget_bytes > 0
        with pytest.raises(ConfigError, match=profile.runtime):
            profile.check_deliverable("onnx")


def test_device_profiles_reject_bad_input(tmp_path):
    from toolchain.device_config import load_device_profile

    assert load_device_profile().name == "desktop-cpu"
    for body, message in (
        ("description: x\nthreds: 4\n", "unknown key bad.threds"),
        ("description: x\nthreads: -1\n", "threads=-1"),
        ("description: x\nmemory_budget_bytes: lots\n", "memory_budget_bytes"),
        ("description: x\nproviders: [XNNPACK]\n", "unknown execution provider"),
        ("description: x\nemulated: maybe\n", "emulated"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(body)
        with pytest.raises(ConfigError, match=message):
            load_device_profile(str(path))
    with pytest.raises(ConfigError, match="shipped profiles"):
        load_device_profile("pixel-9")


@pytest.mark.gpu
def test_cuda_peak_memory():
    import torch

    from benchmarks.memory import cuda_peak_bytes

    peak = cuda_peak_bytes(lambda: torch.ones(1024, 1024, device="cuda").sum())
    assert peak >= 4 * 1024 * 1024


def test_time_interleaved_takes_turns():
    """Every round calls each callable once, the order reversed every other round."""
    from benchmarks.latency import time_interleaved

    calls = []
    timing = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=4)
    assert "".join(calls) == "ab" + "abbaabba"
    assert timing["a"]["repeats"] == timing["b"]["repeats"] == 4


def test_side_by_side_times_the_deliverable_against_the_unpruned_source(finished_run, private_cache):
    """report.json `side_by_side`: each component and a whole image of the deliverable against the
    source exported to the same runtime (the real unpruned source: its UNet matches PyTorch's), the
    export cached outside the run and reused; report.md opens with the speed-up line."""
    import numpy as np
    import torch

    from toolchain import artifact as art
    from toolchain.models.io import load_unet
    from toolchain.pipeline import RunContext
    from toolchain.runtime.ort import component_inputs, ort_feed, ort_session
    from toolchain.stages.benchmark import _source_export

    run_dir = finished_run[0]
    side = _report(run_dir)["side_by_side"]
    rows = {(r["component"], r.get("method")): r for r in side["rows"]}
    assert set(rows) == {(c, None) for c in ("text_encoder", "unet", "vae_decoder")} | {
        ("image", "composed"),
        ("image", "measured"),
    }
    unet = rows[("unet", None)]
    assert unet["size_ratio"] < 0.6 and unet["speedup"] == pytest.approx(
        unet["source_ms"] / unet["deliverable_ms"], 1e-2
    )
    assert rows[("text_encoder", None)]["size_ratio"] == 1.0  # pruning leaves the text encoder alone
    assert (side["source"]["stage"], side["deliverable"]["stage"]) == ("source", "export")
    cached = Path(side["source"]["export_cache"])
    assert private_cache in cached.parents and run_dir not in cached.parents
    cache = _report(run_dir)["cache"]  # where the cache is and what it holds, per kind
    assert (
        cache["dir"] == str(private_cache) and cache["bytes"]["source-exports"] >= side["source"]["export_cache_bytes"]
    )
    assert (cached / "unet" / "model.onnx").stat().st_size == unet["source_bytes"]

    chain = [art.load(p) for p in sorted(run_dir.glob("[0-9][0-9]-*")) if not p.name.endswith("benchmark")]
    source = chain[0].files
    inputs = component_inputs(source, "unet", 2, 0)
    session, _ = ort_session(cached / "unet" / "model.onnx")
    expected = load_unet(source / "unet")(
        *(torch.from_numpy(inputs[k]) for k in ("sample", "timestep")),
        encoder_hidden_states=torch.from_numpy(inputs["encoder_hidden_states"]),
    ).sample
    np.testing.assert_allclose(session.run(None, ort_feed(session, inputs))[0], expected.detach().numpy(), atol=1e-4)

    before = (cached / "unet" / "model.onnx").stat().st_mtime_ns
    ctx = RunContext(run_dir=run_dir, out_dir=run_dir, chain=chain, progress=False)
    folder, info = _source_export(chain, ctx)
    assert folder == cached and info["hit"] and (cached / "unet" / "model.onnx").stat().st_mtime_ns == before
    assert (
        (run_dir / "report.md")
        .read_text()
        .splitlines()[2]
        .startswith(f"**{rows[('image', 'measured')]['speedup']:.1f}x faster per image")
    )


def test_model_card_ships_with_the_deliverable(finished_run):
    """deploy/<target>/README.md: a hub model card whose figures are the report's own."""
    import yaml

    run_dir = finished_run[0]
    card = (run_dir / "deploy" / "onnx" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["pipeline_tag"] == "text-to-image" and "onnx" in header["tags"]
    assert header["license"] == "other" and "names no license" in card  # the tiny source has no card
    measured = next(r for r in _report(run_dir)["side_by_side"]["rows"] if r.get("method") == "measured")
    assert f"| speed-up per image vs the source (onnxruntime, timed in turns) | {measured['speedup']:.2f}x" in card
    assert "ORTStableDiffusionPipeline" in card and "- `prune`: method=channels, ratio=0.3" in card


def test_model_card_carries_the_license_and_counts(tmp_path):
    import yaml

    from benchmarks.model_card import render_card, source_card_header

    (tmp_path / "README.md").write_text("---\nlicense: creativeml-openrail-m\nbase_model: sd-1-5\n---\n# SD\n")
    final = {
        "name": "ort",
        "size_bytes": 2**20,
        "leakage": {"7": 1 / 28},
        "leakage_n": {"7": 28},
        "leakage_ci95": {"7": [0.0063, 0.1771]},
        "attack": {"7": {"heldout_leakage": 0.0, "heldout_leakage_n": 12, "heldout_leakage_ci95": [0.0, 0.2425]}},
        "retain_accuracy": 0.96,
        "retain_n": 252,
    }
    report = {
        "model": {"source": "/models/sd-1-5", "target": "ort", "erase": ["7"]},
        "stages": [{"name": "source", "size_bytes": 2**21, "retain_accuracy": 0.996}, final],
        "parity": [
            {"component": "unet", "format": "ort", "reference": "onnx", "max_abs_err": 1e-6, "tolerance": 1e-4},
            {"component": "unet", "format": "onnx-int8", "max_abs_err": 0.03, "psnr_db": 31.2, "psnr_floor_db": 20.0},
        ],
    }
    card = render_card(
        report, [{"stage": "ort", "config": {"optimization_style": "Fixed"}}], source_card_header(tmp_path)
    )
    header = yaml.safe_load(card.split("---")[1])
    assert (header["license"], header["base_model"], header["library_name"]) == (
        "creativeml-openrail-m",
        "sd-1-5",
        "onnxruntime",
    )
    assert "concept-erasure" in header["tags"] and "names no license" not in card
    assert "| leakage of 7 (images judged as 7) | 3.6% (1/28 images, 95% CI 0.6–17.7%) |" in card
    assert "| leakage of 7 on held-out phrasings | 0.0% (0/12 images, 95% CI 0.0–24.2%) |" in card
    assert "| size | 1.0 MiB, 50% of the source |" in card and "source 99.6%" in card
    assert "required_operators.config" in card and "- `ort`: optimization_style=Fixed" in card
    assert "| parity unet (onnx-int8 vs torch) | max abs error 0.03, PSNR 31.2 dB (floor 20 dB) |" in card
