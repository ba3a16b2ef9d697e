"""Erasure end to end on the embedded digits model: a 30%-channel-pruned student, finetuned
bilevel while unlearning 7 (`compress --target onnx --erase 7`, tests/conftest.py), exported to
ONNX and judged through ONNX Runtime as an app would run it, against the same stage with
unlearning off (finetune.mode=distill). About a minute on 2 CPU cores."""

import dataclasses
import time

from benchmarks.leakage import wilson_interval

N_PER_PROMPT = 8  # 56 images of 7 (one image = 1.8 points), 72 of the other digits


def _scores(generate):
    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain.config import load_concept

    seven = load_concept("7")
    retain = {label: prompts[:1] for label, prompts in seven.retain_prompts.items()}
    return evaluate_concepts(generate, get_judge("digits"), {"7": seven.erase_prompts}, retain, N_PER_PROMPT, seed=0)


def _distill_only(run_dir, out_dir):
    """The run's finetune stage again on the same pruned student, with unlearning off."""
    from toolchain import artifact as art
    from toolchain.config import FinetuneConfig, FinetuneSettings, from_dict
    from toolchain.pipeline import RunContext
    from toolchain.stages import finetune

    sealed = art.load(run_dir / "02-finetune")
    settings = {k: v for k, v in sealed.config.items() if k in {f.name for f in dataclasses.fields(FinetuneConfig)}}
    cfg = from_dict(FinetuneConfig, {**settings, "mode": "distill"}, "finetune")
    chain = [art.load(run_dir / "00-source"), art.load(run_dir / "01-prune")]
    out_dir.mkdir()
    ctx = RunContext(run_dir=run_dir, out_dir=out_dir, chain=chain, progress=False)
    return finetune.run(chain[-1], FinetuneSettings(cfg, ["7"]), ctx).path


def test_unlearning_on_a_pruned_student_holds_through_onnx(erased_digits_run, tmp_path):
    from toolchain import artifact as art
    from toolchain.models.io import PRUNING_RECORD, load_pipeline
    from toolchain.runtime.ort import ort_generator
    from toolchain.runtime.pytorch import diffusers_generator

    start = time.perf_counter()
    pruned, tuned = art.load(erased_digits_run / "01-prune"), art.load(erased_digits_run / "02-finetune")
    assert pruned.records["pruning"]["ratio"] == 0.3 and (pruned.files / "unet" / PRUNING_RECORD).is_file()
    assert tuned.config["mode"] == "bilevel" and tuned.config["objective"] == "esd"
    onnx = _scores(ort_generator(erased_digits_run / "deploy" / "onnx", threads=1))
    distilled = _scores(diffusers_generator(load_pipeline(_distill_only(erased_digits_run, tmp_path / "distill"))))
    n = onnx.leakage_n["7"]
    assert n == distilled.leakage_n["7"] == 7 * N_PER_PROMPT
    erased_high = wilson_interval(round(onnx.leakage["7"] * n), n)[1]
    kept_low = wilson_interval(round(distilled.leakage["7"] * n), n)[0]
    figures = f"leakage of 7: {onnx.leakage['7']:.1%} erased (ONNX) vs {distilled.leakage['7']:.1%} distill-only, n={n}"
    # the 95% intervals do not touch: unlearning, not chance, removed the 7s, and export kept it so
    assert erased_high < kept_low, figures
    assert onnx.leakage["7"] <= 0.15, figures
    # the erased student still draws the other digits, well above the judge's chance rate 1/9
    retain_n = onnx.retain_n
    assert wilson_interval(round(onnx.retain_accuracy * retain_n), retain_n)[0] > 1 / 9, onnx.retain_accuracy
    print(figures, f"retain {onnx.retain_accuracy:.1%} of {retain_n}; judged in {time.perf_counter() - start:.0f} s")
