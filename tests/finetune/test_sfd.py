"""finetune.mode=sfd: Score Forgetting Distillation to a one-step (or k-step) generator.

Tiny real models under fixed seeds (tests/assets/tiny-sd, random weights, 16x16 px) for the losses,
the frozen teacher, resume, the stage and the export; one short run on the embedded digits model
for erasure; the longer digits run is marked `slow`.
"""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolchain.config import ConfigError, FinetuneConfig, FinetuneSettings, SfdConfig

from ..conftest import stage_context

RETAIN = ["a handwritten digit zero", "the number 1", "a handwritten digit two"]
FORGET = [("a handwritten digit seven", "a handwritten digit"), ("the number 7", "a handwritten digit")]
FAST = dict(mode="sfd", batch_size=2, upper_batch_size=2, checkpoint_every=1000)
FAST_SFD = dict(guidance=2.0)  # FinetuneConfig.sfd


@pytest.fixture(scope="module")
def tiny(tiny_sd_dir):
    """(teacher pipeline, pruned student UNet, prompt data, scheduler config)."""
    from toolchain.finetune import prompt_data
    from toolchain.models.io import load_pipeline
    from toolchain.pruning.channels import prune_unet_channels

    pipe = load_pipeline(tiny_sd_dir)
    student = copy.deepcopy(pipe.unet)
    prune_unet_channels(student, 0.3)
    return pipe, student, prompt_data(pipe, RETAIN, FORGET), dict(pipe.scheduler.config)


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_schedule_fields_and_bad_values():
    assert FinetuneConfig(mode="sfd").sfd.schedule == [625]
    assert SfdConfig(steps=2).schedule == [625, 312]
    assert SfdConfig(steps=4).schedule == [625, 468, 312, 156]
    assert SfdConfig(timesteps=[900, 500]).schedule == [900, 500]
    for bad, match in (
        (dict(steps=0), r"finetune\.sfd\.steps=0"),
        (dict(init_timestep=1000), r"finetune\.sfd\.init_timestep"),
        (dict(timesteps=[300, 600]), "strictly decreasing"),
        (dict(tmin=500, tmax=400), r"finetune\.sfd\.tmin"),
        (dict(fake_lr=0.0), r"finetune\.sfd\.fake_lr"),
        (dict(remain_weight=0.0, forget_weight=0.0), "both 0"),
        (dict(guidance=-1.0), r"finetune\.sfd\.guidance"),
    ):
        with pytest.raises(ConfigError, match=match):
            SfdConfig(**bad)


@pytest.mark.parametrize("steps", [1, 2])
def test_one_fake_step_and_one_generator_step_reduce_their_losses(tiny, steps):
    """On a fixed batch: one Adam step of F lowers L_F, one of G lowers L_G; T never changes."""
    from diffusers import DDPMScheduler

    from toolchain.finetune import FewStepGenerator, fake_score_loss, generator_loss, sfd_batch

    pipe, student, data, scheduler_config = tiny
    cfg = FinetuneConfig(**FAST, sfd=SfdConfig(**FAST_SFD, steps=steps))
    scheduler = DDPMScheduler.from_config(scheduler_config)
    teacher = pipe.unet.eval().requires_grad_(False)
    before = _state(teacher)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    generator = FewStepGenerator(copy.deepcopy(student), cfg.sfd.schedule, scheduler.alphas_cumprod, "epsilon")
    shape = (student.config.in_channels, student.config.sample_size, student.config.sample_size)
    batch = sfd_batch(data, cfg, 0, 0, shape)
    assert batch["noises"].shape[0] == steps - 1 and len(batch["pids"]) == 4
    torch.testing.assert_close(batch["weight"].sum(), torch.tensor(2.0))  # remain 1 + forget 1

    opt = torch.optim.Adam(fake.parameters(), lr=1e-4)
    first, _ = fake_score_loss(fake, generator, batch, data.emb, scheduler, cfg)
    first.backward()
    assert all(p.grad is None for p in generator.parameters()), "the fake step must not train G"
    opt.step()
    with torch.no_grad():
        second, _ = fake_score_loss(fake, generator, batch, data.emb, scheduler, cfg)
    assert second < first, (first.item(), second.item())

    fake.zero_grad(set_to_none=True)
    fake.requires_grad_(False)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-4)
    first, per_row = generator_loss(generator, fake, teacher, batch, data.emb, scheduler, cfg)
    assert per_row.shape == (4,)
    first.backward()
    assert all(p.grad is None for p in fake.parameters()) and all(p.grad is None for p in teacher.parameters())
    opt.step()
    with torch.no_grad():
        second, _ = generator_loss(generator, fake, teacher, batch, data.emb, scheduler, cfg)
    assert second < first, (first.item(), second.item())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher changed: {k}"


def test_forget_rows_use_the_override_for_the_teacher_only(tiny):
    from toolchain.finetune import sfd_batch

    pipe, student, data, _ = tiny
    cfg = FinetuneConfig(**FAST, sfd=SfdConfig(**FAST_SFD, negative_forget=True))
    batch = sfd_batch(data, cfg, 3, 0, (4, 8, 8))
    forget = ~batch["is_retain"]
    anchor = data.anchor_pids[0]
    assert (batch["teacher_pids"][forget] == anchor).all() and (batch["pids"][forget] != anchor).all()
    assert (batch["neg_pids"][forget] == batch["pids"][forget]).all() and (batch["neg_pids"][~forget] == 0).all()
    assert (batch["teacher_pids"][~forget] == batch["pids"][~forget]).all()


def test_training_keeps_the_teacher_and_resumes_to_the_same_weights(tiny, tmp_path):
    from toolchain.finetune import train_onestep

    pipe, student, data, scheduler_config = tiny
    cfg = FinetuneConfig(**{**FAST, "checkpoint_every": 1}, steps=2, sfd=SfdConfig(**FAST_SFD, steps=2))
    before = _state(pipe.unet)
    whole, summary = train_onestep(copy.deepcopy(student), pipe.unet, data, cfg, scheduler_config, tmp_path / "a")
    assert summary["generator_timesteps"] == [625, 312] and summary["steps"] == 2
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), f"teacher changed: {k}"
    changed = [k for k, v in whole.state_dict().items() if not torch.equal(v, student.state_dict()[k])]
    assert changed, "the generator did not train"
    lines = [json.loads(x) for x in (tmp_path / "a" / "losses.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1] and {"fake_loss", "g_loss", "g_forget"} <= set(lines[0])

    train_onestep(copy.deepcopy(student), pipe.unet, data, cfg, scheduler_config, tmp_path / "b", stop_after=1)
    resumed, summary = train_onestep(copy.deepcopy(student), pipe.unet, data, cfg, scheduler_config, tmp_path / "b")
    assert summary["resumed_at"] == 1
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_stage_exports_and_runs_the_generator_like_any_unet(tiny_sd_dir, tmp_path):
    """finetune.run(mode=sfd) writes a pipeline with onestep.json; the ONNX export carries it, and
    the exported generator in ONNX Runtime draws the images its PyTorch twin draws."""
    from export.onnx import export_onnx
    from toolchain import artifact as art
    from toolchain.models.io import check_pipeline_folder, load_pipeline
    from toolchain.runtime.ort import OrtPipeline, ort_generator
    from toolchain.runtime.pytorch import diffusers_generator
    from toolchain.runtime.schedule import SCHEDULE_FILE, read_schedule
    from toolchain.stages import finetune

    ctx = stage_context(tmp_path, tiny_sd_dir)
    out = ctx.out_dir
    before = art.hash_folder(tiny_sd_dir)
    cfg = FinetuneConfig(enabled=True, **FAST, steps=1, sfd=SfdConfig(**FAST_SFD, steps=2))
    result = finetune.run(art.Artifact(path=tiny_sd_dir, kind="diffusers"), FinetuneSettings(cfg, ["7"]), ctx)
    assert art.hash_folder(tiny_sd_dir) == before, "the input must never be modified"
    check_pipeline_folder(out)
    assert not (out / "checkpoints").exists() and not (out / "teacher_samples.safetensors").exists()
    assert read_schedule(out)["timesteps"] == [625, 312]
    assert result.records["finetune"]["mode"] == "sfd" and result.records["finetune"]["forget_prompts"] == 7

    pipe = load_pipeline(out)
    onnx_dir = tmp_path / "onnx"
    exported = export_onnx(pipe, onnx_dir, progress=False)
    assert exported["generator_schedule"] == [625, 312]
    assert (onnx_dir / SCHEDULE_FILE).read_text() == (out / SCHEDULE_FILE).read_text()
    prompts = ["the number 1", "a handwritten digit two", "the number 7"]
    torch_images = diffusers_generator(pipe)(prompts, seed=3)  # reads onestep.json from the folder
    files = {c: f"{c}/model.onnx" for c in ("text_encoder", "unet", "vae_decoder")}
    ort_pipe = OrtPipeline(onnx_dir, files)
    assert ort_pipe.schedule["timesteps"] == [625, 312]
    ort_images = ort_pipe(prompts, seed=3)
    assert ort_images.shape == torch_images.shape == (3, 16, 16, 3)
    np.testing.assert_allclose(ort_images, torch_images, atol=2e-3)
    np.testing.assert_allclose(ort_generator(onnx_dir)(prompts, seed=3), torch_images, atol=2e-3)
    # the same weights sampled as a 25-step diffusion model give other images: the schedule is used
    assert np.abs(diffusers_generator(pipe, schedule=None)(prompts, seed=3) - torch_images).max() > 1e-2


SFD_PROCESS_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from toolchain import artifact as art
from toolchain.config import FinetuneConfig, FinetuneSettings, from_dict
from toolchain.pipeline import RunContext
from toolchain.stages import finetune
model, base, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
rank = int(os.environ["RANK"])
out = base / ("out.partial" if rank == 0 else f"rank{rank}.partial")  # each process's own view of the folder
out.mkdir()
chain = [art.Artifact(path=base / "src", kind="diffusers", model_path=model)]
ctx = RunContext(run_dir=base, out_dir=out, chain=chain, progress=False)
result = finetune.run(art.Artifact(path=model, kind="diffusers"), FinetuneSettings(from_dict(FinetuneConfig, settings), ["7"]), ctx)
(base / f"returned{rank}.json").write_text(json.dumps(None if result is None else result.records["finetune"]))
"""


def test_sfd_under_two_processes_only_process_0_writes(tiny_sd_dir, tmp_path):
    """`finetune.mode=sfd` under torchrun with 2 CPU processes (gloo): both train, process 0 writes the
    artifact and returns it, process 1 returns None and writes nothing. Process 1 is handed its own
    output folder so that any pipeline link, UNet, schedule or checkpoint removal of its would show."""
    import os
    import subprocess
    import sys

    from toolchain.models.io import check_pipeline_folder
    from toolchain.runtime.schedule import read_schedule

    (tmp_path / "run.py").write_text(SFD_PROCESS_SCRIPT)
    settings = {**FAST, "sfd": FAST_SFD, "enabled": True, "steps": 2, "checkpoint_every": 1}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(29700 + os.getpid() % 1000), str(tmp_path / "run.py"), str(tiny_sd_dir)]
    result = subprocess.run([*cmd, str(tmp_path), json.dumps(settings)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "returned0.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 2
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "rank1.partial").rglob("*"))
    assert written == [], f"process 1 wrote {written[:5]}"
    assert json.loads((tmp_path / "returned1.json").read_text()) is None
    out = tmp_path / "out.partial"
    check_pipeline_folder(out)
    assert read_schedule(out)["timesteps"] == [625] and not (out / "checkpoints").exists()


def _digits_sfd(steps: int, n_per_prompt: int, prune_ratio: float = 0.0, **settings):
    """SFD erasing 7 on the digits model, G initialised from the (optionally channel-pruned) model;
    scores on 3 prompts of 7 and 1 prompt per other digit of the untrained one-step generator
    ("before") and of the trained one ("after")."""
    import tempfile

    from benchmarks.leakage import evaluate_concepts, get_judge
    from toolchain.config import load_concept
    from toolchain.finetune import prompt_data, retain_prompt_list, train_onestep
    from toolchain.models.io import EMBEDDED_MODEL, load_pipeline
    from toolchain.pruning.channels import prune_unet_channels
    from toolchain.runtime.pytorch import diffusers_generator

    seven = load_concept("7")
    cfg = FinetuneConfig(mode="sfd", steps=steps, checkpoint_every=10**6, **settings)
    pipe = load_pipeline(EMBEDDED_MODEL)
    data = prompt_data(pipe, retain_prompt_list(cfg, [seven]), [(p, seven.anchor_prompt) for p in seven.erase_prompts])
    student = copy.deepcopy(pipe.unet)
    if prune_ratio:
        prune_unet_channels(student, prune_ratio)
    judge = get_judge("digits")
    erase = {"7": seven.erase_prompts[:3]}
    retain = {k: v[:1] for k, v in seven.retain_prompts.items()}
    schedule = {"timesteps": cfg.sfd.schedule, "prediction_type": "epsilon"}
    teacher, scores = pipe.unet, {}
    for name in ("before", "after"):
        if name == "after":
            with tempfile.TemporaryDirectory() as tmp:
                student, _ = train_onestep(student, teacher, data, cfg, dict(pipe.scheduler.config), Path(tmp))
        pipe.unet = student.eval()
        generate = diffusers_generator(pipe, schedule=schedule)
        scores[name] = evaluate_concepts(generate, judge, erase, retain, n_per_prompt, seed=1)
    pipe.unet = teacher
    return scores


def test_sfd_draws_digits_and_lowers_seven_on_digits_short():
    """Short run (G from the unpruned model, which already draws digits in one step; small batches):
    loose bars, the benchmark (benchmarks/studies/onestep_digits.py) holds the strict ones."""
    scores = _digits_sfd(steps=12, n_per_prompt=2, batch_size=4, upper_batch_size=4)
    assert scores["before"].leakage["7"] >= 0.5, scores["before"]
    assert scores["after"].leakage["7"] <= 0.5, scores["after"]
    assert scores["after"].leakage["7"] < scores["before"].leakage["7"]
    assert scores["after"].retain_accuracy >= 0.5, scores["after"]


@pytest.mark.slow
def test_sfd_erases_seven_from_pruned_digits():
    """The real setting: G from a 30%-channel-pruned student, which draws no digits before."""
    scores = _digits_sfd(steps=150, n_per_prompt=8, prune_ratio=0.3, batch_size=8, upper_batch_size=8)
    assert scores["after"].leakage["7"] <= 0.2, scores["after"]
    assert scores["after"].retain_accuracy >= 0.8, scores["after"]
