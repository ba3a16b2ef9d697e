"""The regression gate fails closed and gates the erase figures of every stage, exported models
included; every share carries its image count and 95% Wilson interval (report.json, report.md,
plots). Reports are small dicts built here; one test judges the shipped digits model."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.regress import Tolerances, check_all, compare
from toolchain.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
BASELINE = REPO / "benchmarks" / "results" / "baseline-default.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _stage(name: str, leaked: int = 1, heldout: int = 0, prompt_attack: float | None = None) -> dict:
    """A judged stage of an erase-7 run: 14 leakage images, 126 retained, 6 held-out."""
    attack = {"heldout_leakage": heldout / 6, "heldout_leakage_n": 6}
    if prompt_attack is not None:
        attack.update(prompt_attack=prompt_attack, prompt_attack_n=28, soft_prompt_attack=None, attacked_on="finetune")
    return {
        "name": name,
        "size_bytes": 1000,
        "leakage": {"7": leaked / 14},
        "leakage_n": {"7": 14},
        "retain_accuracy": 118 / 126,
        "retain_n": 126,
        "fid": 0.4,
        "attack": {"7": attack},
    }


def _erase_report() -> dict:
    stages = [_stage("source", 14), _stage("finetune", prompt_attack=0.25), _stage("export", prompt_attack=0.25)]
    stages += [_stage("quantize", prompt_attack=0.25), _stage("ort", prompt_attack=0.25)]
    return {"model": {"erase": ["7"]}, "stages": stages, "latency": [], "memory": [], "parity": []}


def _failed(report: dict, baseline: dict, **kwargs) -> dict[str, str]:
    return {r.metric: r.verdict for r in compare(report, baseline, **kwargs)}


# --------------------------------------------------------------------------- Wilson intervals


def test_wilson_interval_matches_hand_computed_values():
    """z = 1.96, z²/n = 3.8415/14 = 0.27439: 0/14 -> [0, 0.27439 / 1.27439] = [0, 0.2153];
    7/14 -> 0.5 ± 1.96 / 1.27439 · sqrt(0.25/14 + 3.8415/784) = 0.5 ± 0.2320."""
    from benchmarks.leakage import share_interval, wilson_interval

    assert wilson_interval(0, 14) == (0.0, pytest.approx(0.2153, abs=1e-4))
    assert wilson_interval(7, 14) == (pytest.approx(0.2680, abs=1e-4), pytest.approx(0.7320, abs=1e-4))
    assert wilson_interval(14, 14) == (pytest.approx(0.7847, abs=1e-4), 1.0)
    assert share_interval(1 / 14, 14) == [0.0127, 0.3147]
    assert share_interval(float("nan"), 14) is None and share_interval(0.5, 0) is None
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(15, 14)


class _MeanJudge:
    """A judge for images whose pixels all hold digit / 10: reads the digit back."""

    name = "mean"
    classes = tuple("0123456789")

    def classify(self, images):
        class Result:
            labels = np.asarray([str(round(float(i.mean()) * 10)) for i in images])

        return Result()


def test_concept_scores_carry_counts_and_intervals():
    from benchmarks.leakage import evaluate_concepts

    def generate(prompts, seed):  # the first "seven" is drawn as a 7, every other seven as a 1
        digits = [int(p[-1]) for p in prompts]
        digits = [1 if d == 7 and i > 0 else d for i, d in enumerate(digits)]
        return np.stack([np.full((4, 4), d / 10, np.float32) for d in digits])

    scores = evaluate_concepts(generate, _MeanJudge(), {"7": ["a 7", "the 7"]}, {"3": ["a 3"]}, 7, seed=0)
    assert scores.leakage == {"7": 1 / 14} and scores.retain_accuracy == 1.0
    assert scores.intervals() == {
        "leakage_n": {"7": 14},
        "leakage_ci95": {"7": [0.0127, 0.3147]},  # 1/14, as computed by hand above
        "retain_n": 7,
        "retain_ci95": [pytest.approx(0.6457, abs=1e-4), 1.0],  # 7/7: 1 / (1 + 3.8415 / 7)
    }
    assert scores.per_label_n == {"7": 14, "3": 7}


def test_benchmark_stage_entry_carries_counts_beside_every_share():
    """The stage's entry for the shipped digits model: leakage, retain accuracy and held-out
    leakage each with `_n` and `_ci95`; the old keys keep their shape (report.json contract)."""
    from benchmarks.leakage import share_interval
    from toolchain.artifact import Artifact
    from toolchain.config import BenchmarkConfig
    from toolchain.stages.benchmark import _evaluate, _evaluation_plan

    source = Artifact(path=REPO / "toolchain" / "assets" / "digits-sd", kind="diffusers", stage="source")
    cfg = BenchmarkConfig(eval_images_per_prompt=1, eval_steps=2)
    plan = _evaluation_plan(source, ["7"], cfg)
    _, entry, _ = _evaluate(source, plan, cfg)
    assert isinstance(entry["leakage"]["7"], float) and isinstance(entry["retain_accuracy"], float)
    assert entry["leakage_n"] == {"7": len(plan["erase"]["7"])}
    assert entry["retain_n"] == sum(len(p) for p in plan["retain"].values())
    assert entry["leakage_ci95"]["7"] == share_interval(entry["leakage"]["7"], entry["leakage_n"]["7"])
    assert entry["retain_ci95"] == share_interval(entry["retain_accuracy"], entry["retain_n"])
    held = entry["attack"]["7"]
    assert held["heldout_leakage_n"] == len(plan["heldout"]["7"]) == 3
    assert held["heldout_leakage_ci95"] == share_interval(held["heldout_leakage"], 3)


# --------------------------------------------------------------------------- the gate fails closed


def test_gate_fails_on_an_empty_report():
    baseline = json.loads(BASELINE.read_text())
    failed = _failed({}, baseline)
    assert failed and set(failed.values()) == {"MISSING", "DIFFERS"} and failed["model erase"] == "DIFFERS"
    assert "retain_accuracy export" in failed and "size_bytes finetune" in failed
    assert any(m.startswith("latency ") for m in failed) and any(m.startswith("parity ") for m in failed)


def test_gate_fails_on_nan():
    baseline = json.loads(BASELINE.read_text())
    report = copy.deepcopy(baseline)
    report["stages"][-1]["retain_accuracy"] = float("nan")
    assert _failed(report, baseline) == {"retain_accuracy export": "NaN"}
    report = _erase_report()
    report["stages"][2]["leakage"]["7"] = math.nan
    assert _failed(report, _erase_report()) == {"leakage export/7": "NaN"}
    assert _failed(_erase_report(), report) == {"leakage export/7": "BASELINE NaN"}


def test_gate_names_a_missing_or_unjudged_metric_and_allow_missing_lets_it_through():
    baseline = _erase_report()
    report = _erase_report()
    del report["stages"][3]["leakage"]  # quantize not judged
    report["stages"][4]["attack"]["7"]["prompt_attack"] = None  # ort: attack not run
    assert _failed(report, baseline) == {"leakage quantize/7": "MISSING", "prompt_attack ort/7": "MISSING"}
    allowed = ("leakage quantize/7", "prompt_attack *")
    assert _failed(report, baseline, allow_missing=allowed) == {}
    rows = check_all(report, baseline, Tolerances(), allowed)
    assert {r.metric for r in rows if r.verdict == "missing (allowed)"} == {"leakage quantize/7", "prompt_attack ort/7"}
    # a stage the report lacks fails with each of its metrics; a value that regressed is no "missing"
    report["stages"] = report["stages"][:2]
    stages = {m.split()[1].split("/")[0] for m in _failed(report, baseline, allow_missing=allowed)}
    assert stages == {"export", "quantize", "ort"}
    report = _erase_report()
    report["stages"][3]["leakage"]["7"] = 5 / 14
    assert _failed(report, baseline, allow_missing=("leakage",)) == {"leakage quantize/7": "REGRESSION"}


def test_gate_compares_the_exported_models_erase_figures():
    baseline = _erase_report()
    for stage, key in (("export", "heldout_leakage"), ("quantize", "leakage"), ("ort", "prompt_attack")):
        report = _erase_report()
        entry = next(s for s in report["stages"] if s["name"] == stage)
        if key == "leakage":
            entry["leakage"]["7"] = 3 / 14  # two images more than the baseline's one
        else:
            figures = entry["attack"]["7"]
            figures[key] += 0.5
        assert _failed(report, baseline) == {f"{key} {stage}/7": "REGRESSION"}
    report = _erase_report()
    report["stages"][4]["retain_accuracy"] = 110 / 126
    assert _failed(report, baseline) == {"retain_accuracy ort": "REGRESSION"}
    report = _erase_report()
    report["model"]["erase"] = []  # a run that erased nothing is no evidence for one that erased 7
    assert _failed(report, baseline)["model erase"] == "DIFFERS"


# --------------------------------------------------------------------------- tolerances in images


def test_default_share_tolerance_is_one_image_at_small_samples():
    """Defaults: 2 leakage / 3 retain points, or one image where the sample is smaller."""
    baseline = _erase_report()
    report = _erase_report()
    report["stages"][3]["leakage"]["7"] = 2 / 14  # one image more: within 7.1 points
    report["stages"][3]["attack"]["7"]["heldout_leakage"] = 1 / 6  # one image more: within 16.7 points
    report["stages"][3]["retain_accuracy"] = 117 / 126  # one image fewer (0.8 points): within 3
    assert _failed(report, baseline) == {}
    report["stages"][3]["retain_accuracy"] = 114 / 126  # four fewer: 3.2 points
    assert _failed(report, baseline) == {"retain_accuracy quantize": "REGRESSION"}


def test_fewer_images_than_the_baseline_fail_and_do_not_widen_the_gate():
    """Half the leakage images at 50% leakage would pass a tolerance of one (now larger) image."""
    baseline = _erase_report()
    report = copy.deepcopy(baseline)
    export = report["stages"][2]
    export.update(leakage={"7": 0.5}, leakage_n={"7": 2}, retain_accuracy=0.5, retain_n=2)
    failed = _failed(report, baseline)
    assert failed["leakage export/7"].startswith("FEWER IMAGES (2 < 14)")
    assert failed["retain_accuracy export"].startswith("FEWER IMAGES (2 < 126)")
    del report["stages"][3]["leakage_n"]  # a report without counts against a baseline with them
    assert _failed(report, baseline)["leakage quantize/7"].startswith("FEWER IMAGES (no count < 14)")
    nan_latency = {"runtime": "onnxruntime", "stage": "export", "component": "unet", "median_ms": 1.0}
    baseline["latency"] = [nan_latency]
    current = {**copy.deepcopy(baseline), "latency": [{**nan_latency, "median_ms": float("nan")}]}
    current["machine"] = {"cpu": "another"}
    assert any(v == "NaN" for k, v in _failed(current, baseline).items() if k.startswith("latency")), (
        "NaN fails anywhere"
    )


def test_tolerance_finer_than_one_image_is_refused():
    baseline = _erase_report()
    with pytest.raises(ConfigError) as error:
        compare(_erase_report(), baseline, Tolerances(leakage_points=2))
    message = str(error.value)
    assert "leakage_points=2 is below one image (7.1 points at 14 images" in message
    assert "raise it to at least 7.2 or evaluate more images (benchmark.eval_images_per_prompt)" in message
    with pytest.raises(ConfigError, match=r"16\.7 points at 6 images, heldout_leakage source/7"):
        compare(_erase_report(), baseline, Tolerances(leakage_points=7.2))
    assert compare(_erase_report(), baseline, Tolerances(leakage_points=16.7)) == []
    with pytest.raises(ConfigError, match=r"retain_points=0\.5 is below one image \(0\.8 points at 126 images"):
        compare(_erase_report(), baseline, Tolerances(retain_points=0.5))
    report = _erase_report()  # the baseline's sample decides; a smaller one in the report fails
    report["stages"][0]["leakage_n"]["7"] = 7
    assert _failed(report, baseline, tolerances=Tolerances(leakage_points=16.7)) == {
        "leakage source/7": "FEWER IMAGES (7 < 14)"
    }


# --------------------------------------------------------------------------- the CLI gate


def _write(path: Path, report: dict) -> str:
    path.write_text(json.dumps({"schema_version": 1, **report}))
    return str(path)


def test_cli_gate_fails_closed_and_exits_2_on_an_unresolvable_tolerance(tmp_path, capsys):
    from toolchain.cli import main

    baseline = _write(tmp_path / "baseline.json", _erase_report())
    assert main(["bench", _write(tmp_path / "empty.json", {}), "--baseline", baseline]) == 1
    captured = capsys.readouterr()
    assert "MISSING" in captured.out and "leakage ort/7 (MISSING)" in captured.err
    report = _erase_report()
    del report["stages"][3]["leakage"]
    current = _write(tmp_path / "report.json", report)
    assert main(["bench", current, "--baseline", baseline]) == 1
    assert "leakage quantize/7 (MISSING)" in capsys.readouterr().err
    assert main(["bench", current, "--baseline", baseline, "--allow-missing", "leakage quantize/7"]) == 0
    assert "1 allowed missing" in capsys.readouterr().out
    assert main(["bench", current, "--baseline", baseline, "--tolerance", "leakage_points=2"]) == 2
    assert "leakage_points=2 is below one image (7.1 points at 14 images" in capsys.readouterr().err
    assert main(["bench", current, "--baseline", _write(tmp_path / "nothing.json", {})]) == 2
    assert "no metric to compare" in capsys.readouterr().err


# --------------------------------------------------------------------------- report.md and plots


def test_markdown_gives_counts_and_intervals(tmp_path):
    from benchmarks.plots import QUALITY_PNG, attack_plot, write_plots
    from benchmarks.report import render_markdown

    report = {
        **_erase_report(),
        "per_label_accuracy": {"source": {"3": 1.0}},
        "per_label_n": {"source": {"3": 14}},
    }
    text = render_markdown(report)
    assert "7: 0.07143 (1/14, 0.013–0.315)" in text  # leakage
    assert "0.9365 (118/126, 0.880–0.967)" in text  # retain accuracy
    assert "7: 0 (0/6, 0.000–0.390)" in text  # held-out leakage
    assert "1 (14/14, 0.785–1.000)" in text  # per-label accuracy
    assert "95% Wilson interval" in text
    assert QUALITY_PNG in write_plots(report, {}, tmp_path)
    for path in (tmp_path / QUALITY_PNG, attack_plot(report["stages"], tmp_path / "attack.png")):
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_draw_the_wilson_intervals():
    from benchmarks.plots import _wilson_errors

    errors = _wilson_errors([1 / 14, 0.5, np.nan], [14, None, 14])
    assert errors[:, 0] == pytest.approx([1 / 14 - 0.0127, 0.3147 - 1 / 14], abs=1e-4)
    assert errors[:, 1].tolist() == [0.0, 0.0] and errors[:, 2].tolist() == [0.0, 0.0]


def _timed(torch_ms: float, gpu_ms: float, probe: float | None) -> dict:
    """An erase report with one CPU and one CUDA latency row and the machine's speed probe."""
    report = _erase_report()
    row = {"runtime": "torch", "profile": "p", "stage": "finetune", "component": "unet", "batch": 2}
    report["latency"] = [
        {**row, "provider": "cpu", "median_ms": torch_ms},
        {**row, "runtime": "onnxruntime", "provider": "CUDAExecutionProvider", "median_ms": gpu_ms},
    ]
    report["machine"] = {"cpu": "AMD EPYC", "cores": 2, "system": "Linux"}
    if probe is not None:
        report["machine"]["speed_probe_ms"] = probe
    return report


def test_absolute_latency_is_shown_not_gated_unless_asked():
    """By default an absolute latency is an `info` row whatever it measured (a shared machine swings
    1.2-2.2x); missing or NaN still fails, since the gate fails closed."""
    baseline = _timed(30.0, 10.0, probe=20.0)
    rows = {r.metric: r for r in check_all(_timed(300.0, 100.0, probe=20.0), baseline, Tolerances())}
    assert rows["latency torch/p/finetune/unet/2"].verdict == "info" and not [r for r in rows.values() if r.failed]
    gone = _timed(30.0, float("nan"), probe=20.0)
    gone["latency"].pop(0)
    assert _failed(gone, baseline) == {
        "latency torch/p/finetune/unet/2": "MISSING",
        "latency onnxruntime/p/finetune/unet/2": "NaN",
    }


def test_cpu_latency_limits_follow_the_machines_measured_speed():
    """With absolute_latency, same CPU model, a machine running the probe 2x slower: CPU rows 2x
    slower pass (the limit is scaled), a CPU row 2x slower on an equally fast machine fails, GPU rows
    are never scaled, and a report without a usable probe is held to the unscaled limits."""
    strict = {"absolute_latency": True}
    baseline = _timed(30.0, 10.0, probe=20.0)
    slow_machine = _timed(60.0, 10.0, probe=40.0)
    rows = {r.metric: r for r in check_all(slow_machine, baseline, Tolerances(), **strict)}
    assert not [r for r in rows.values() if r.failed]
    info = rows["machine speed_probe_ms (CPU latency limits x2.00)"]
    assert (info.baseline, info.current, info.verdict) == (20.0, 40.0, "info")
    assert rows["latency torch/p/finetune/unet/2"].limit == pytest.approx(90.0)
    regressed = {"latency torch/p/finetune/unet/2": "REGRESSION"}
    assert _failed(_timed(60.0, 10.0, probe=20.0), baseline, **strict) == regressed
    gpu = {"latency onnxruntime/p/finetune/unet/2": "REGRESSION"}
    assert _failed(_timed(30.0, 20.0, probe=40.0), baseline, **strict) == gpu
    for probe in (None, float("nan"), 0.0):
        assert _failed(_timed(60.0, 10.0, probe=probe), baseline, **strict) == regressed
    # a faster machine tightens the limits: 30 ms where the probe says 2x faster is a regression
    assert _failed(_timed(30.0, 10.0, probe=10.0), baseline, **strict) == regressed


def _side(unet_speedup: float | None, image_speedup: float, runtime: str = "onnxruntime") -> dict:
    """An erase report with side-by-side rows: a sub-millisecond text encoder, the UNet, a measured image."""
    report = _erase_report()
    report["machine"] = {"cpu": "AMD EPYC", "cores": 2, "system": "Linux"}
    rows = [
        {"component": "text_encoder", "batch": 2, "deliverable_ms": 0.5, "speedup": 1.0},
        {"component": "unet", "batch": 2, "deliverable_ms": 5.0, "speedup": unet_speedup},
        {"component": "image", "batch": 1, "method": "measured", "deliverable_ms": 150.0, "speedup": image_speedup},
    ]
    report["side_by_side"] = {"runtime": runtime, "rows": [r for r in rows if r["speedup"] is not None]}
    return report


def test_speed_is_gated_as_the_speedup_over_the_source():
    """speed-up >= baseline / speedup_ratio (1.3); a sub-millisecond row is shown only; a missing,
    NaN or other-runtime row fails; another machine's rows pass as `other machine`."""
    baseline = _side(2.0, 1.6)
    rows = {r.metric: r for r in check_all(_side(1.6, 1.3), baseline, Tolerances())}
    assert rows["speedup onnxruntime/unet/2"].limit == pytest.approx(2.0 / 1.3)
    assert not [r for r in rows.values() if r.failed]
    assert rows["speedup onnxruntime/text_encoder/2"].verdict == "info"
    assert _failed(_side(1.5, 1.6), baseline) == {"speedup onnxruntime/unet/2": "REGRESSION"}
    assert _failed(_side(1.5, 1.6), baseline, tolerances=Tolerances(speedup_ratio=1.5)) == {}
    assert _failed(_side(None, 1.6), baseline) == {"speedup onnxruntime/unet/2": "MISSING"}
    assert _failed(_side(float("nan"), 1.6), baseline) == {"speedup onnxruntime/unet/2": "NaN"}
    assert len(_failed(_side(2.0, 1.6, runtime="ort"), baseline)) == 3  # another runtime is no comparison
    elsewhere = _side(1.0, 1.0)
    elsewhere["machine"]["cpu"] = "Apple M2"
    assert {r.verdict for r in check_all(elsewhere, baseline, Tolerances()) if r.metric.startswith("speedup")} == {
        "other machine"
    }


def test_speed_probe_times_a_fixed_workload():
    from benchmarks.latency import speed_probe

    probe = speed_probe(repeats=3)
    assert isinstance(probe, float) and 0 < probe < 10_000
