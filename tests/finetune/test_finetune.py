"""toolchain.finetune and the finetune stage: distillation, objectives, modes, resume, multi-process, bad input.

Tiny real models under fixed seeds (tests/assets/tiny-sd, random weights, 16x16 px), plus one
short run on the embedded digits model for erasure; heavier checks are marked `slow`.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolchain.config import (
    ConfigError,
    EraseDiffConfig,
    FinetuneConfig,
    FinetuneSettings,
    PenaltyConfig,
    RunConfig,
)

from ..conftest import stage_context

RETAIN = ["a handwritten digit zero", "the number 1", "a handwritten digit two"]
FORGET = [("a handwritten digit seven", "a handwritten digit"), ("the number 7", "a handwritten digit")]
FAST = dict(
    samples_per_prompt=2,
    sample_steps=2,
    batch_size=4,
    upper_batch_size=4,
    checkpoint_every=1000,
    lower_lr=1e-3,
    upper_lr=1e-3,
)


@pytest.fixture(scope="module")
def tiny(tiny_sd_dir, tmp_path_factory):
    """(teacher pipeline, pruned student UNet, training data, scheduler config)."""
    from toolchain.finetune import prepare_data
    from toolchain.models.io import load_pipeline
    from toolchain.pruning.channels import prune_unet_channels

    pipe = load_pipeline(tiny_sd_dir)
    cache = tmp_path_factory.mktemp("samples") / "teacher_samples.safetensors"
    data = prepare_data(pipe, RETAIN, FORGET, FinetuneConfig(**FAST), cache)
    student = copy.deepcopy(pipe.unet)
    prune_unet_channels(student, 0.3)
    return pipe, student, data, dict(pipe.scheduler.config)


def _train(tiny, tmp_path, **overrides):
    from toolchain.finetune import train

    pipe, student, data, scheduler_config = tiny
    stop_after = overrides.pop("stop_after", None)
    cfg = FinetuneConfig(**{**FAST, **overrides})
    return train(copy.deepcopy(student), pipe.unet, data, cfg, scheduler_config, tmp_path, stop_after=stop_after)


def _losses(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "losses.jsonl").read_text().splitlines()]


def _state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


# ---------------------------------------------------------------------------------------- data


def test_teacher_samples_are_cached_and_reused(tiny, tmp_path):
    from toolchain.finetune import prepare_data

    pipe, _, data, _ = tiny
    cfg = FinetuneConfig(**FAST)
    assert data.latents.shape == ((1 + len(RETAIN) + 2 + 1) * 2, 4, 8, 8)  # "" + retain + forget + anchor
    assert len(data.retain_rows) == len(RETAIN) * 2 and len(data.forget_rows) == 4
    first = prepare_data(pipe, RETAIN, FORGET, cfg, tmp_path / "s.safetensors")
    mtime = (tmp_path / "s.safetensors").stat().st_mtime_ns
    again = prepare_data(pipe, RETAIN, FORGET, cfg, tmp_path / "s.safetensors")
    assert (tmp_path / "s.safetensors").stat().st_mtime_ns == mtime, "a matching cache must be reused"
    assert torch.equal(first.latents, again.latents)


def test_teacher_sample_shares_add_up_to_the_whole(tiny):
    """A process's share (`rows`) draws its rows from the same noise: the shares of two processes,
    concatenated, are the one-process samples."""
    from toolchain.finetune.data import sample_teacher

    pipe, _, data, _ = tiny
    cfg = FinetuneConfig(**FAST)
    prompts = ["", *RETAIN[:2]]
    whole = sample_teacher(pipe, prompts, cfg)
    shares = [sample_teacher(pipe, prompts, cfg, rows=r) for r in (range(0, 4), range(4, 6), range(6, 6))]
    assert [len(s) for s in shares] == [4, 2, 0]
    torch.testing.assert_close(torch.cat(shares), whole, atol=1e-5, rtol=1e-4)


def test_teacher_samples_come_from_the_cross_run_cache(tiny, tmp_path, monkeypatch):
    """Keyed by teacher fingerprint, prompts and settings: the second call with the same teacher
    generates nothing; another teacher (or seed) makes its own entry."""
    from toolchain.finetune import data as data_module

    pipe, _, _, _ = tiny
    cfg = FinetuneConfig(**FAST)
    first, info = data_module.shared_teacher_samples(pipe, ["", "7"], cfg, tmp_path, "teacher-a")
    assert not info["hit"] and info["bytes"] > first.numel() * 4 and Path(info["cache"]).parent.parent == tmp_path

    def refuse(*args, **kwargs):
        raise AssertionError("a cached teacher must not be sampled again")

    monkeypatch.setattr(data_module, "sample_teacher", refuse)
    again, info = data_module.shared_teacher_samples(pipe, ["", "7"], cfg, tmp_path, "teacher-a")
    assert info["hit"] and torch.equal(first, again)
    with pytest.raises(AssertionError, match="must not be sampled"):
        data_module.shared_teacher_samples(pipe, ["", "7"], cfg, tmp_path, "teacher-b")
    with pytest.raises(ValueError, match="fingerprint"):  # no key, no cache: never shared by accident
        data_module.shared_teacher_samples(pipe, ["", "7"], cfg, tmp_path, "")


def _write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(path)
        paths.append(path)
    return paths


def test_image_caption_folders(tmp_path):
    from toolchain.finetune import read_image_folder

    paths = _write_images(tmp_path / "hf", 3)
    (tmp_path / "hf" / "metadata.jsonl").write_text(
        '{"file_name": "img0.png", "text": "zero"}\n{"file_name": "img1.png", "text": "one"}\n'
    )
    (tmp_path / "hf" / "img2.txt").write_text("two\n")
    assert read_image_folder(tmp_path / "hf") == list(zip(paths, ["zero", "one", "two"], strict=True))
    # concept images without captions take the erase prompts in turn
    _write_images(tmp_path / "plain", 3)
    assert [c for _, c in read_image_folder(tmp_path / "plain", ["a", "b"])] == ["a", "b", "a"]
    with pytest.raises(ConfigError, match="no caption"):
        read_image_folder(tmp_path / "plain")
    with pytest.raises(ConfigError, match="no such directory"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images"):
        read_image_folder(tmp_path / "empty")
    (tmp_path / "hf" / "metadata.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match="metadata.jsonl:1"):
        read_image_folder(tmp_path / "hf")


def test_image_data_gives_x0_rows(tiny, tmp_path):
    """Retain images and concept images become x_0 rows (VAE latents) beside the teacher samples."""
    from toolchain.finetune import encode_images, prepare_data, read_image_folder

    pipe = tiny[0]
    _write_images(tmp_path / "r", 2)
    for i in range(2):
        (tmp_path / "r" / f"img{i}.txt").write_text(f"retained caption {i}")
    retain = read_image_folder(tmp_path / "r")
    _write_images(tmp_path / "c", 3, seed=1)
    concept = [(p, c, "a handwritten digit") for p, c in read_image_folder(tmp_path / "c", ["seven"])]
    data = prepare_data(pipe, [], [], FinetuneConfig(**FAST), tmp_path / "s.safetensors", False, retain, concept)
    sampled = 2 * 2  # "" and the anchor prompt, 2 samples each
    assert data.latents.shape[0] == sampled + 2 + 3
    assert data.retain_rows.tolist() == [sampled, sampled + 1]
    assert data.forget_rows.tolist() == [sampled + 2, sampled + 3, sampled + 4]
    expected = encode_images(pipe, [p for p, _ in retain] + [p for p, *_ in concept])
    assert torch.allclose(data.latents[sampled:], expected)
    assert expected.shape[1:] == (4, 8, 8) and expected.std() > 0
    # prompt ids point at the captions' and the anchor's embeddings
    assert len(set(data.retain_pids.tolist())) == 2 and len(set(data.forget_pids.tolist())) == 1
    assert set(data.anchor_rows.tolist()) <= set(range(sampled))


def test_changed_images_rerun_finetune(tmp_path):
    from toolchain.config import from_dict
    from toolchain.pipeline import STAGES, _stage_config

    _write_images(tmp_path / "r", 2)
    cfg = from_dict(RunConfig, {"finetune": {"enabled": True, "mode": "distill", "retain_data": str(tmp_path / "r")}})
    before = _stage_config(STAGES["finetune"], cfg)
    _write_images(tmp_path / "r", 2, seed=5)
    assert _stage_config(STAGES["finetune"], cfg) != before


def test_retain_prompts_are_every_other_digit():
    from toolchain.config import load_concept
    from toolchain.finetune import retain_prompt_list

    prompts = retain_prompt_list(FinetuneConfig(), [load_concept("7")])
    seven = load_concept("7").erase_prompts
    assert not set(prompts) & set(seven)
    assert set(load_concept("3").erase_prompts) <= set(prompts)
    assert len(prompts) == sum(len(load_concept(str(d)).erase_prompts) for d in range(10) if d != 7)
    assert retain_prompt_list(FinetuneConfig(retain_prompts=["x"]), []) == ["x"]


def test_min_snr_weights_epsilon_and_v():
    from diffusers import DDPMScheduler

    from toolchain.finetune import min_snr_weights
    from toolchain.runtime.schedule import diffusion_target

    t = torch.tensor([0, 500, 999])
    eps = DDPMScheduler(prediction_type="epsilon")
    snr = eps.alphas_cumprod[t] / (1 - eps.alphas_cumprod[t])
    assert torch.allclose(min_snr_weights(eps, t, 5.0), torch.clamp(snr, max=5.0) / snr)
    v = DDPMScheduler(prediction_type="v_prediction")
    assert torch.allclose(min_snr_weights(v, t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(diffusion_target(eps, x0, noise, t), noise)
    assert torch.allclose(diffusion_target(v, x0, noise, t), v.get_velocity(x0, noise, t))


# ------------------------------------------------------------------------------------ distill


def test_distill_loss_falls_teacher_frozen_and_pruned_widths_projected(tiny, tmp_path):
    pipe, student, _, _ = tiny
    teacher_before = _state(pipe.unet)
    trained, summary = _train(tiny, tmp_path, mode="distill", steps=80, lower_lr=3e-3)
    losses = [r["lower"] for r in _losses(tmp_path)]
    assert len(losses) == 80
    assert sum(losses[-20:]) < 0.95 * sum(losses[:20]), losses
    # distillation alone (the random tiny teacher denoises badly, so L_diff pulls elsewhere) brings
    # the student's output close to the teacher's on a fixed noised batch of teacher samples
    from diffusers import DDPMScheduler

    data = tiny[2]
    g = torch.Generator().manual_seed(123)
    sel = torch.randint(0, len(data.retain_rows), (16,), generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    x0 = data.latents[data.retain_rows[sel]]
    x_t = DDPMScheduler.from_config(tiny[3]).add_noise(x0, torch.randn(x0.shape, generator=g), t)
    emb = data.emb[data.retain_pids[sel]]
    kd_only, _ = _train(tiny, tmp_path / "kd", mode="distill", steps=80, lower_lr=3e-3, w_diff=0.0)
    with torch.no_grad():
        ref = pipe.unet(x_t, t, emb).sample
        before, after = (torch.nn.functional.mse_loss(u(x_t, t, emb).sample, ref) for u in (student, kd_only))
    assert after < 0.5 * before, (before, after)
    assert all(r["feat_kd"] > 0 for r in _losses(tmp_path))
    widths = summary["feature_kd_blocks"]
    assert set(widths) == {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    assert any(s != t for s, t in widths.values()), "channel pruning must leave some widths different"
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher changed: {k}"
    assert all(not p.requires_grad for p in pipe.unet.parameters())


def test_feature_kd_matching_skips_pruned_blocks(tiny, tmp_path):
    _, summary = _train(tiny, tmp_path, mode="distill", steps=1, feature_kd="matching")
    assert all(s == t for s, t in summary["feature_kd_blocks"].values())


# --------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("objective", ["esd", "ablation", "override", "all-but-one", "erasediff", "erasediff-inner"])
def test_each_objective_loss_falls(tiny, tmp_path, objective):
    extra = {}
    if objective == "erasediff-inner":  # L_f* from 1 step on a copy, for the log
        objective, extra = "erasediff", {"erasediff": EraseDiffConfig(inner_steps=1)}
    _train(tiny, tmp_path, mode="sequential", steps=16, unlearn_steps=15, objective=objective, **extra)
    records = _losses(tmp_path)
    key = "forget" if objective == "erasediff" else "upper"
    upper = [r[key] for r in records if key in r]
    assert len(upper) == 15
    assert sum(upper[-4:]) < sum(upper[:4]), (objective, upper)
    if extra:
        assert all("forget_gap" in r for r in records[1:])
    if objective == "erasediff":  # the authors' fixed λ (lambda_bome 0.1)
        assert all(r["erasediff_lambda"] == 0.1 and "retain" in r for r in records[1:])


def test_erasediff_lambda_is_the_authors_fixed_one():
    """Default λ = 0.1 (JingWu321/EraseDiff's lambda_bome); the cosine-based "adaptive" rule is gone."""
    from toolchain.config import from_dict

    assert FinetuneConfig().erasediff.lambda_bome == 0.1
    with pytest.raises(ConfigError, match=r"erasediff\.lambda_bome=-1.0: must be >= 0"):
        EraseDiffConfig(lambda_bome=-1.0)
    with pytest.raises(ConfigError, match=r"finetune\.erasediff_lambda is now finetune\.erasediff\.lambda_bome"):
        from_dict(RunConfig, {"finetune": {"erasediff_lambda": 0.1}})
    with pytest.raises(ConfigError, match="unknown key finetune.erasediff_eta"):
        from_dict(RunConfig, {"finetune": {"erasediff_eta": 0.1}})


def test_override_objective_matches_the_teacher_override_score(tiny):
    """`override` = MSE(S(x_t, c_f), sg[T(x_t, c_override)]); the old name `sfd` is refused, naming both."""
    from toolchain.unlearning import ForgetBatch, get_objective

    pipe, student, data, _ = tiny
    g = torch.Generator().manual_seed(0)
    x_t, t = torch.randn((2, 4, 8, 8), generator=g), torch.tensor([100, 700])
    cond, anchor = data.emb[data.forget_pids[:2]], data.emb[data.anchor_pids[:2]]
    batch = ForgetBatch(x_t=x_t, t=t, cond=cond, uncond=data.emb[[0, 0]], anchor=anchor)

    def student_fn(x, t, e):
        return student(x, t, encoder_hidden_states=e).sample

    def teacher_fn(x, t, e):
        return pipe.unet(x, t, encoder_hidden_states=e).sample

    with torch.no_grad():
        loss = get_objective("override")(
            student_fn, teacher_fn, batch, FinetuneConfig(objective="override").objective_settings
        )
        expected = torch.nn.functional.mse_loss(student_fn(x_t, t, cond), teacher_fn(x_t, t, anchor))
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="objective=sfd is now `override`.*finetune.mode=sfd"):
        FinetuneConfig(objective="sfd")


@pytest.mark.parametrize("subset", ["cross_attention", "non_cross_attention"])
def test_upper_steps_change_only_the_trainable_subset(tiny, tmp_path, subset):
    from toolchain.unlearning import trainable_parameters

    _, student, _, _ = tiny
    before = _state(student)
    # every step is an upper step: sequential with unlearn_steps = steps - 1, and a zero-lr distill step
    trained, _ = _train(tiny, tmp_path, mode="sequential", steps=4, unlearn_steps=3, trainable=subset, lower_lr=1e-12)
    chosen = {name for name, _ in trainable_parameters(trained, subset)}
    after = trained.state_dict()
    changed = {k for k in after if not torch.allclose(after[k], before[k], atol=1e-8)}
    assert changed, "nothing was trained"
    assert changed <= chosen, f"changed outside {subset}: {sorted(changed - chosen)[:5]}"
    assert all((".attn2." in k) == (subset == "cross_attention") for k in changed)


def test_bilevel_interleaves_upper_steps(tiny, tmp_path):
    _train(tiny, tmp_path, mode="bilevel", steps=6, upper_every=3)
    records = _losses(tmp_path)
    assert [r["step"] for r in records if "upper" in r] == [2, 5]
    assert all("lower" in r for r in records)


def test_bome_direction_descends_on_the_gap_no_faster_than_needed():
    from toolchain.finetune import bome_direction

    g = torch.Generator().manual_seed(0)
    grad_q = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    norm = sum((q**2).sum() for q in grad_q)
    for sign in (-1.0, 1.0):  # ∇L_CU against and along ∇q
        grad_f = [sign * 3 * q + torch.randn(q.shape, generator=g) for q in grad_q]
        d, lam = bome_direction(grad_f, grad_q, 0.5)
        along = sum((a * q).sum() for a, q in zip(d, grad_q, strict=True))
        if sign < 0:  # λ is the smallest that makes <d, ∇q> = η|∇q|²
            assert lam > 0 and torch.isclose(along, 0.5 * norm, rtol=1e-4)
        else:  # the upper gradient already descends on q fast enough: λ = 0, d = ∇L_CU
            assert lam == 0 and all(torch.equal(a, f) for a, f in zip(d, grad_f, strict=True))
    d, lam = bome_direction(grad_f, [torch.zeros(3, 4), torch.zeros(5)], 0.5)
    assert lam == 0 and all(torch.equal(a, f) for a, f in zip(d, grad_f, strict=True))


def test_bilevel_penalty_inner_solution_reaches_the_student(tiny, tmp_path):
    """BOME on split variables: the inner steps change the student (with one shared set of weights
    they could not), every step logs q and λ >= 0, and more inner steps open a larger gap."""
    from toolchain.unlearning import trainable_parameters

    runs = {}
    for k in (1, 4):
        trained, _ = _train(
            tiny,
            tmp_path / f"k{k}",
            mode="bilevel-penalty",
            steps=3,
            penalty=PenaltyConfig(inner_steps=k),
            trainable="cross_attention",
        )
        runs[k] = (trained.state_dict(), _losses(tmp_path / f"k{k}"))
    upper = {name for name, _ in trainable_parameters(tiny[1], "cross_attention")}
    start = tiny[1].state_dict()
    for part in (upper, set(start) - upper):  # both variable groups move, and differently for K = 1 and 4
        assert any(not torch.equal(runs[1][0][k], start[k]) for k in part)
        assert any(not torch.allclose(runs[1][0][k], runs[4][0][k]) for k in part), "inner steps never reach θ"
    for _, records in runs.values():
        assert len(records) == 3 and all(r["penalty_lambda"] >= 0 and "gap" in r for r in records)
    gap = {k: sum(r["gap"] for r in records) for k, (_, records) in runs.items()}
    assert gap[4] > gap[1], gap


def test_bilevel_penalty_needs_split_variables():
    with pytest.raises(ConfigError, match="trainable=cross_attention or non_cross_attention"):
        FinetuneConfig(mode="bilevel-penalty")
    FinetuneConfig(mode="bilevel-penalty", trainable="non_cross_attention")


# ------------------------------------------------------------------------------- robust runs


@pytest.mark.parametrize("mode", ["bilevel", "bilevel-penalty"])
def test_killed_run_resumes_to_the_same_weights(tiny, tmp_path, mode):
    settings = dict(mode=mode, steps=6, upper_every=2, checkpoint_every=2, penalty=PenaltyConfig(inner_steps=1))
    if mode == "bilevel-penalty":
        settings["trainable"] = "cross_attention"
    full, _ = _train(tiny, tmp_path / "full", **settings)
    _train(tiny, tmp_path / "killed", stop_after=3, **settings)  # "killed" after step 3; checkpoint at 2
    assert json.loads((tmp_path / "killed/checkpoints/step-0000002/state.json").read_text())["step"] == 2
    resumed, summary = _train(tiny, tmp_path / "killed", **settings)
    assert summary["resumed_at"] == 2
    for k, v in full.state_dict().items():
        assert torch.allclose(v, resumed.state_dict()[k], atol=1e-6), k
    assert [r["step"] for r in _losses(tmp_path / "killed")] == list(range(6))
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")


def test_divergence_stops_with_the_last_good_checkpoint(tiny, tmp_path):
    from toolchain.errors import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match="lower loss") as err:
        _train(tiny, tmp_path, mode="distill", steps=4, checkpoint_every=1, lower_lr=1e4, max_loss=2.0)
    assert "last good checkpoint" in str(err.value)
    assert list((tmp_path / "checkpoints").glob("step-*")), "the last good checkpoint must be kept"


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("objective", "nope", "esd"),
        ("upper_every", 0, "upper_every"),
        ("mode", "joint", "distill"),
        ("steps", 0, "steps"),
        ("prompt_dropout", 1.0, "prompt_dropout"),
    ],
)
def test_bad_config_values_are_refused(field, value, match):
    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(**{field: value})


def test_unknown_objective_names_the_valid_ones():
    from toolchain.config import OBJECTIVE_NAMES
    from toolchain.unlearning import get_objective, objective_names

    assert objective_names() == ["ablation", "all-but-one", "erasediff", "esd", "override"] == list(OBJECTIVE_NAMES)
    with pytest.raises(ValueError, match="all-but-one"):
        get_objective("nope")
    with pytest.raises(ValueError, match="cross_attention"):
        from toolchain.unlearning import trainable_parameters

        trainable_parameters(torch.nn.Linear(2, 2), "attention")


@pytest.mark.parametrize("mode", ["bilevel", "sequential", "bilevel-penalty", "sfd"])
def test_unlearning_without_erase_is_refused(mode):
    from toolchain.config import check_finetune
    from toolchain.finetune import check_config

    split = {"trainable": "cross_attention"}  # bilevel-penalty needs upper and lower variables
    with pytest.raises(ConfigError, match="--erase"):
        check_config(FinetuneConfig(mode=mode, **split), [])
    with pytest.raises(ConfigError, match="--erase"):
        check_finetune(FinetuneConfig(enabled=True, mode=mode, **split), [])
    check_config(FinetuneConfig(mode="distill"), [])
    check_finetune(FinetuneConfig(enabled=True, mode="distill"), [])


def test_one_step_distillation_that_forgets_nothing_needs_no_erase():
    """mode=sfd with sfd.forget_weight=0 is plain one-step distillation: `--recipe one-step` without
    --erase makes a one-step generator instead of refusing."""
    from toolchain.config import SfdConfig, check_finetune, load_config
    from toolchain.finetune import check_config

    plain = FinetuneConfig(enabled=True, mode="sfd", sfd=SfdConfig(forget_weight=0.0))
    check_config(plain, [])
    check_finetune(plain, [])
    with pytest.raises(ConfigError, match="forget_weight=0"):
        check_finetune(load_config("one-step", "onnx", [], [])[0].finetune, [])
    cfg, _ = load_config("one-step", "onnx", ["finetune.sfd.forget_weight=0"], [])
    check_finetune(cfg.finetune, [])
    assert cfg.finetune.mode == "sfd" and not cfg.finetune.unlearns


def test_erase_concept_without_prompts_is_refused(tmp_path):
    from toolchain.finetune import check_config

    concept = tmp_path / "empty.yaml"
    concept.write_text("name: empty\njudge: digits\nlabel: x\nerase_prompts: []\n")
    with pytest.raises(ConfigError, match="erase_prompts is empty"):
        check_config(FinetuneConfig(), [str(concept)])


def test_batch_not_divisible_by_processes_and_accumulation(tiny, tmp_path):
    with pytest.raises(ConfigError, match="divisible"):
        FinetuneConfig(batch_size=6, gradient_accumulation_steps=4)


def test_gradient_accumulation_matches_one_big_batch(tiny, tmp_path):
    one, _ = _train(tiny, tmp_path / "one", mode="bilevel", steps=2, upper_every=2, prompt_dropout=0.0)
    acc, _ = _train(
        tiny,
        tmp_path / "acc",
        mode="bilevel",
        steps=2,
        upper_every=2,
        prompt_dropout=0.0,
        gradient_accumulation_steps=2,
    )
    _assert_same_training(tiny[1].state_dict(), one.state_dict(), acc.state_dict())


def _assert_same_training(start, a, b, share=0.01):
    """a and b took the same steps from `start`: they differ by < `share` of how far they moved.

    Not allclose per tensor: Adam's first steps divide by |g|, so float-summation-order noise
    in near-zero gradients (another batch split) moves single weights by up to ~lr."""
    moved = torch.cat([(a[k].float() - start[k].float()).flatten() for k in start]).norm()
    apart = torch.cat([(a[k].float() - b[k].float()).flatten() for k in start]).norm()
    assert moved > 0, "nothing was trained"
    assert apart < share * moved, f"runs differ by {apart:.3g}, {apart / moved:.2%} of the distance moved {moved:.3g}"


def test_gradient_checkpointing_gives_the_same_step(tiny, tmp_path):
    plain, _ = _train(tiny, tmp_path / "plain", mode="distill", steps=2)
    ckpt, _ = _train(tiny, tmp_path / "ckpt", mode="distill", steps=2, gradient_checkpointing=True)
    _assert_same_training(tiny[1].state_dict(), plain.state_dict(), ckpt.state_dict())


# ------------------------------------------------------------------------------------- stage


def test_stage_writes_a_pipeline_that_loads(tiny_sd_dir, tmp_path):
    """run() end to end on the tiny pipeline: pruned input, erase digit 7, bilevel."""
    from toolchain import artifact as art
    from toolchain.models.io import check_pipeline_folder, load_pipeline, load_unet, save_unet
    from toolchain.pruning.channels import prune_unet_channels
    from toolchain.stages import finetune

    pruned = tmp_path / "pruned"
    from toolchain.models.io import link_pipeline

    link_pipeline(tiny_sd_dir, pruned, skip=("unet",))
    unet = load_unet(tiny_sd_dir / "unet")
    save_unet(unet, pruned / "unet", prune_unet_channels(unet, 0.3))
    before = art.hash_folder(pruned)
    ctx = stage_context(tmp_path, tiny_sd_dir)
    out = ctx.out_dir
    cfg = FinetuneConfig(enabled=True, **{**FAST, "samples_per_prompt": 1}, steps=4, upper_every=2)
    result = finetune.run(art.Artifact(path=pruned, kind="diffusers"), FinetuneSettings(cfg, ["7"]), ctx)
    assert art.hash_folder(pruned) == before, "the input must never be modified"
    check_pipeline_folder(out)
    assert not (out / "checkpoints").exists() and (out / "losses.jsonl").is_file()
    assert result.records["finetune"]["forget_prompts"] == 7
    assert result.records["finetune"]["retain_prompts"] == 63
    pipe = load_pipeline(out)
    assert sum(p.numel() for p in pipe.unet.parameters()) == sum(p.numel() for p in unet.parameters())
    samples = result.records["finetune"]["teacher_samples"]  # made in the cross-run cache, not the folder
    assert not samples["hit"] and samples["bytes"] > 0 and not list(out.glob("*.safetensors"))


# ------------------------------------------------------------------------------ multi-process

DDP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from toolchain.config import FinetuneConfig
from toolchain.models.io import load_pipeline, load_unet
from toolchain.finetune import TrainingData, train
import json
pipe_dir, student_dir, data_file, out, cfg_json = sys.argv[1:6]
pipe = load_pipeline(__import__("pathlib").Path(pipe_dir))
data = TrainingData(**load_file(data_file))
cfg = FinetuneConfig(**json.loads(cfg_json))
student, summary = train(load_unet(__import__("pathlib").Path(student_dir)), pipe.unet, data, cfg,
                   dict(pipe.scheduler.config), __import__("pathlib").Path(out))
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, out + "/final.safetensors")
    open(out + "/summary.json", "w").write(json.dumps(summary))
"""


@pytest.mark.slow
def test_two_cpu_processes_match_one(tiny, tiny_sd_dir, tmp_path):
    """Two CPU processes (torchrun env vars; Accelerate picks MULTI_CPU with gloo) end with the
    weights of one process training on the same global batch."""
    from safetensors.torch import load_file, save_file

    from toolchain.models.io import save_unet
    from toolchain.pruning.channels import prune_unet_channels

    pipe, student, data, _ = tiny
    pruned = copy.deepcopy(pipe.unet)
    save_unet(pruned, tmp_path / "student", prune_unet_channels(pruned, 0.3))  # magnitude: = `student`
    save_file(data.tensors(), tmp_path / "data.safetensors")
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    cfg = json.dumps({**FAST, "mode": "bilevel", "steps": 4, "upper_every": 2, "prompt_dropout": 0.0})
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "ACCELERATE_USE_CPU": "1",
    }  # what `accelerate launch --cpu` sets: MULTI_CPU with gloo
    finals = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        out.mkdir()
        # accelerate launch --cpu needs mpirun for several processes; torchrun's env:// + gloo does not
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(29400 + n + os.getpid() % 1000),
        ]
        cmd += [
            str(tmp_path / "ddp.py"),
            str(tiny_sd_dir),
            str(tmp_path / "student"),
            str(tmp_path / "data.safetensors"),
            str(out),
            cfg,
        ]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        finals[n] = load_file(out / "final.safetensors")
        assert json.loads((out / "summary.json").read_text())["processes"] == n
    _assert_same_training(student.state_dict(), finals[1], finals[2])


@pytest.mark.slow
def test_the_cli_under_two_processes_matches_one(tiny_sd_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m toolchain.cli ...` (what `accelerate launch --multi_gpu -m
    toolchain.cli` starts, here on CPU with gloo): process 0 runs the chain, process 1 joins the
    finetune stage; the distilled UNet equals a one-process run's, and only process 0 writes."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    settings = [
        "finetune.enabled=true",
        "finetune.mode=distill",
        "finetune.steps=4",
        "finetune.batch_size=4",
        "finetune.samples_per_prompt=2",
        "finetune.sample_steps=2",
        "finetune.prompt_dropout=0.0",
        "finetune.lower_lr=1e-3",
        "benchmark.judge=none",
    ]
    weights = {}
    for n in (1, 2):
        out = tmp_path / f"run{n}"
        env["COMPRESS_CACHE"] = str(tmp_path / f"cache{n}")  # both processes draw their share of the samples
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", str(29500 + n + os.getpid() % 1000)]
        cmd = [*launcher, "-m", "toolchain.cli", "--target", "onnx", "--model", str(tiny_sd_dir)]
        cmd += ["--recipe", "tiny", "--out", str(out), "--no-progress", "-q", *settings]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("deployable:") == 1, "only process 0 reports"
        summary = json.loads((out / "02-finetune" / "manifest.json").read_text())["records"]["finetune"]
        assert summary["processes"] == n and not summary["teacher_samples"]["hit"]
        assert (out / "report.json").is_file() and not list(out.glob("*.partial"))
        weights[n] = load_file(out / "02-finetune" / "unet" / "diffusion_pytorch_model.safetensors")
    start = load_file(tmp_path / "run1" / "01-prune" / "unet" / "diffusion_pytorch_model.safetensors")
    _assert_same_training(start, weights[1], weights[2])


# ------------------------------------------------------------------------------ digits world


@pytest.mark.parametrize("name", ["finetune-digits", "penalty-digits"])
def test_committed_finetune_results_render_from_their_json(name):
    """benchmarks/results/NAME.md is NAME.json rendered by the script plus a marked hand-written
    section; the JSON holds only what the script writes, and its command reads nothing under /tmp
    but the teacher-sample cache, which the script makes when it is missing."""
    from benchmarks.studies.finetune_digits import ROWS, render

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    result = json.loads((results / f"{name}.json").read_text())
    assert set(result) <= {"command", "machine", "versions", "settings", "rows", "timing"}, sorted(result)
    assert render(result, results / f"{name}.md") == (results / f"{name}.md").read_text()
    args = result["command"].split()
    # files recorded before the studies moved to benchmarks/studies/ name the old module path
    assert args[:3] in (
        ["python", "-m", m] for m in ("benchmarks.studies.finetune_digits", "benchmarks.finetune_digits")
    )
    assert all(args[i - 1] == "--samples-cache" for i, arg in enumerate(args) if arg.startswith("/tmp"))
    assert set(result["rows"]) <= set(ROWS)


def _digits_erasure(prune_ratio: float, samples_per_prompt: int, n_per_prompt: int, with_teacher=True, **settings):
    """Bilevel ESD erasing 7 from the digits model (channel-pruned by `prune_ratio`); returns the
    teacher's and the student's ConceptScores on 3 prompts of 7 and 1 prompt per other digit."""
    import tempfile

    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain.config import load_concept
    from toolchain.finetune import prepare_data, retain_prompt_list, train
    from toolchain.models.io import EMBEDDED_MODEL, load_pipeline
    from toolchain.pruning.channels import prune_unet_channels
    from toolchain.runtime.pytorch import diffusers_generator

    seven = load_concept("7")
    cfg = FinetuneConfig(mode="bilevel", samples_per_prompt=samples_per_prompt, checkpoint_every=10**6, **settings)
    pipe = load_pipeline(EMBEDDED_MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_data(
            pipe,
            retain_prompt_list(cfg, [seven]),
            [(p, seven.anchor_prompt) for p in seven.erase_prompts],
            cfg,
            Path(tmp) / "s.safetensors",
        )
        student = copy.deepcopy(pipe.unet)
        if prune_ratio:
            prune_unet_channels(student, prune_ratio)
        student, _ = train(student, pipe.unet, data, cfg, dict(pipe.scheduler.config), Path(tmp))
    judge = get_judge("digits")
    erase = {"7": seven.erase_prompts[:3]}
    retain = {k: v[:1] for k, v in seven.retain_prompts.items()}
    scores = {}
    for name, unet in (("teacher", pipe.unet), ("student", student.eval()))[0 if with_teacher else 1 :]:
        pipe.unet = unet
        scores[name] = evaluate_concepts(diffusers_generator(pipe), judge, erase, retain, n_per_prompt, seed=1)
    return scores


@pytest.mark.slow  # 30 s; the default run's erasure test is tests/test_e2e_erase.py (a pruned student, through ONNX)
def test_bilevel_lowers_leakage_of_seven_on_digits_short():
    """Short variant (unpruned student, 30 steps each with an upper step, 9 retain prompts): loose bars."""
    from toolchain.config import load_concept

    one_each = [prompts[0] for prompts in load_concept("7").retain_prompts.values()]
    scores = _digits_erasure(
        0.0,
        samples_per_prompt=1,
        n_per_prompt=4,
        with_teacher=False,  # the teacher draws every digit (test_digits_world); 7 leaks 100%
        steps=30,
        upper_every=1,
        upper_lr=5e-4,
        retain_prompts=one_each,
    )
    assert scores["student"].leakage["7"] <= 0.5, scores["student"]
    assert scores["student"].retain_accuracy >= 0.7, scores["student"]


@pytest.mark.slow
def test_bilevel_erases_seven_from_pruned_digits():
    """The real setting: 30% channel-pruned student, default bilevel settings."""
    scores = _digits_erasure(0.3, samples_per_prompt=4, n_per_prompt=8, steps=300)
    assert scores["teacher"].leakage["7"] >= 0.9
    assert scores["student"].leakage["7"] <= 0.2, scores["student"]
    assert scores["student"].retain_accuracy >= 0.8, scores["student"]


def test_feature_kd_widths_put_every_input_on_the_models_device(tiny_sd_dir):
    """The timestep stayed on the CPU while the UNets were on CUDA (found by device_tests/gpu_check.py);
    the meta device stands in for CUDA: any CPU tensor meeting a meta weight raises."""
    from diffusers import UNet2DConditionModel

    from toolchain.finetune import TrainingData, kd_block_widths

    student = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").to("meta")
    teacher = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").to("meta")
    c, size = student.config.in_channels, student.config.sample_size
    rows = torch.zeros(1, dtype=torch.long)
    data = TrainingData(
        latents=torch.randn(2, c, size, size),
        emb=torch.randn(1, 4, student.config.cross_attention_dim),
        **dict.fromkeys(
            ("retain_rows", "retain_pids", "forget_rows", "forget_pids", "anchor_pids", "anchor_rows"), rows
        ),
    )
    widths = kd_block_widths(student, teacher, data, "project")
    assert widths and all(s == t for s, t in widths.values())
