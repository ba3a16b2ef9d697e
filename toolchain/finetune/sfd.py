"""`finetune.mode=sfd`: Score Forgetting Distillation to a one-step (or k-step) generator.

Method: Chen, Zhang, Zhou, "Score Forgetting Distillation" (ICLR 2025; code
`tqch/score-forgetting-distillation`, SD/training/training_loop.py), built on score identity
distillation (SiD / SiD-LSG, `mingyuanzhou/SiD`). Data-free: it needs prompt embeddings only, no
images and no teacher samples.

Networks: T = frozen teacher (the true score, `ctx.chain[0]`'s UNet); G = the generator, a UNet of
the student's architecture initialised from the student (pruned or not) and trained in place;
F = the fake score, a trained copy of the teacher (`sfd.fake_init=teacher`, as SiD) or of the
student. ᾱ_t and the prediction type (epsilon or v) come from the scheduler config.

Generator with timesteps t_1 > ... > t_k (k = 1: one step), as SiD's sampler:
    x = sqrt(1 − ᾱ_1)·z,  z ~ N(0, I)                       (x_0 = 0 noised to t_1)
    x0 = pred_x0(G(x, t_1, c), x, t_1)
    i = 2..k:  x = sqrt(ᾱ_i)·x0 + sqrt(1 − ᾱ_i)·ε_i,  x0 = pred_x0(G(x, t_i, c), x, t_i)
Guidance is distilled into G: sampling runs G once per step at batch 1 per image, no CFG.
Training back-propagates through all k calls (SiD's `train_sampler`).

Every step is one fake-score step, then one generator step, on a global batch of
`batch_size` retain prompts c and `upper_batch_size` forget prompts c_f, each paired with its
concept's override prompt c_o (`ConceptConfig.anchor_prompt`). Sums run over latent pixels,
means over rows; retain rows are weighted `sfd.remain_weight`, forget rows `sfd.forget_weight`.
- Fake step (G frozen): x_g = G(z, c), x_t = sqrt(ᾱ_t)·x_g + sqrt(1 − ᾱ_t)·n, t ~ U[tmin, tmax),
  L_F = Σ ‖F_κ(x_t, t, c) − target‖²·w_t with target n (epsilon) or v, w_t = 1 (epsilon) or
  SNR/(SNR + 1) (v); F_κ is F under classifier-free guidance κ = `sfd.guidance` (SiD-LSG's κ1);
  `prompt_dropout` of the rows use "" for G and F. Forget rows use c = c_f.
- Generator step (F frozen): y_r, y_f = x0 estimates of T and F at x_t (guidance κ in both);
  L_G = Σ (y_r − y_f)·[(y_r − x_g) − α·(y_r − y_f)] / w,  w = mean|x_g − y_r| (no gradient)
  (for α = 1 this is SiD's (y_r − y_f)·(y_f − x_g) / w). Retain rows: T and F under c. Forget
  rows: F under c_f but T under the override c_o, so G's distribution for c_f is pulled to the
  teacher's for c_o (the unlearning). `sfd.negative_forget` guides T's override estimate away
  from c_f (the forget prompt takes the place of "" in its CFG; SFD's negative prompts).
  The gradient reaches G through x_g and through x_t inside T and F; T and F are not updated.
Optimisers: Adam, betas (0, 0.999), eps 1e-8, as SiD.

Conventions shared with the other loops of this package (loop.py): HF Accelerate (each process
takes its slice of the global batch), batches drawn from generators seeded by (seed, step, stream)
so a resumed run repeats an uninterrupted one, `losses.jsonl`, `checkpoints/` (checkpoints.py: G,
F and both optimisers every `checkpoint_every` steps) and `TrainingDivergedError`.

The step schedule goes with the model: `onestep.json` (SCHEDULE_FILE, written by the stage) at the
top of the pipeline folder, copied by every later stage and exporter; the samplers of
`toolchain.runtime` read it and sample with `generator_sample`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.config import ConfigError, FinetuneConfig
from toolchain.errors import TrainingDivergedError
from toolchain.finetune.checkpoints import (
    CHECKPOINTS,
    LOSSES_FILE,
    append_loss,
    latest_checkpoint,
    load_checkpoint,
    restart_losses,
    save_checkpoint,
)
from toolchain.finetune.data import TrainingData, encode_prompts
from toolchain.runtime.schedule import diffusion_target, generator_sample, pred_x0

# ----------------------------------------------------------------------------------------------
# The generator


class FewStepGenerator(nn.Module):
    """G as one module (one DDP forward for all k calls): (z, noises, emb) -> x0 (B, C, h, w)."""

    def __init__(self, unet, timesteps: list[int], alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        self.unet = unet
        self.timesteps = list(timesteps)
        self.alphas_cumprod = alphas_cumprod.float().cpu()
        self.prediction_type = prediction_type

    def forward(self, z, noises, emb):
        def call(x_t, t, e):
            return self.unet(x_t, torch.full((len(x_t),), t, device=x_t.device), encoder_hidden_states=e).sample

        return generator_sample(call, z, noises, emb, self.timesteps, self.alphas_cumprod, self.prediction_type)


# ----------------------------------------------------------------------------------------------
# Data and losses


def prompt_data(pipe, retain: list[str], forget: list[tuple[str, str]]) -> TrainingData:
    """`TrainingData` with prompt embeddings only (no teacher samples: SFD is data-free).

    forget: (forget prompt, override prompt) pairs."""
    prompts = list(dict.fromkeys(["", *retain, *(p for p, _ in forget), *(a for _, a in forget)]))
    pid = {p: i for i, p in enumerate(prompts)}
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    size = pipe.unet.config.sample_size
    return TrainingData(
        latents=torch.zeros((0, pipe.unet.config.in_channels, size, size)),
        emb=encode_prompts(pipe, prompts),
        retain_rows=long([]),
        retain_pids=long([pid[p] for p in retain]),
        forget_rows=long([]),
        forget_pids=long([pid[p] for p, _ in forget]),
        anchor_pids=long([pid[a] for _, a in forget]),
        anchor_rows=long([]),
    )


def sfd_batch(data, cfg: FinetuneConfig, step: int, stream: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Global batch, retain rows first: prompt ids for G and F (`pids`), for T (`teacher_pids`: the
    override for forget rows), T's negative (`neg_pids`), dropout mask, z, re-noising draws,
    score noise, t and the per-row loss weights (they sum to the two weights)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 16 + stream)
    n_r = cfg.batch_size if cfg.sfd.remain_weight > 0 else 0
    n_f = cfg.upper_batch_size if cfg.sfd.forget_weight > 0 and len(data.forget_pids) else 0
    ri = torch.randint(len(data.retain_pids), (n_r,), generator=g)
    fi = torch.randint(max(1, len(data.forget_pids)), (n_f,), generator=g)
    forget = data.forget_pids[fi] if n_f else torch.zeros(0, dtype=torch.long)
    anchor = data.anchor_pids[fi] if n_f else torch.zeros(0, dtype=torch.long)
    n = n_r + n_f
    k = len(cfg.sfd.schedule)
    return {
        "pids": torch.cat([data.retain_pids[ri], forget]),
        "teacher_pids": torch.cat([data.retain_pids[ri], anchor]),
        "neg_pids": torch.cat([torch.zeros(n_r, dtype=torch.long), forget if cfg.sfd.negative_forget else 0 * forget]),
        "drop": torch.rand(n, generator=g) < cfg.prompt_dropout,
        "z": torch.randn((n, *shape), generator=g),
        "noises": torch.randn((k - 1, n, *shape), generator=g),
        "noise": torch.randn((n, *shape), generator=g),
        "t": torch.randint(cfg.sfd.tmin, cfg.sfd.tmax, (n,), generator=g),
        "weight": torch.cat(
            [
                torch.full((n_r,), cfg.sfd.remain_weight / max(n_r, 1)),
                torch.full((n_f,), cfg.sfd.forget_weight / max(n_f, 1)),
            ]
        ),
        "is_retain": torch.arange(n) < n_r,
    }


def guided_output(unet, x_t, t, cond, uncond, scale: float) -> torch.Tensor:
    """UNet output under classifier-free guidance: u + scale·(c − u); one call at batch 2B."""
    if scale == 1.0:
        return unet(x_t, t, encoder_hidden_states=cond).sample
    out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = out.chunk(2)
    return u + scale * (c - u)


def fake_score_loss(fake, generator, batch, emb, scheduler, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-score loss (weighted sum, scalar) and its per-row values (B,); G gets no gradient."""
    pids = torch.where(batch["drop"], torch.zeros_like(batch["pids"]), batch["pids"])
    cond, uncond = emb[pids], emb[torch.zeros_like(pids)]
    with torch.no_grad():
        x_g = generator(batch["z"], batch["noises"], cond).float()
    t, noise = batch["t"], batch["noise"]
    x_t = scheduler.add_noise(x_g, noise, t)
    out = guided_output(fake, x_t, t, cond, uncond, cfg.sfd.guidance).float()
    target = diffusion_target(scheduler, x_g, noise, t)
    per_row = ((out - target) ** 2).sum(dim=(1, 2, 3))
    if scheduler.config.prediction_type == "v_prediction":
        a = scheduler.alphas_cumprod.to(t.device)[t].float()
        per_row = per_row * (a / (1 - a)) / (a / (1 - a) + 1)
    return (per_row * batch["weight"]).sum(), per_row.detach()


def generator_loss(generator, fake, teacher, batch, emb, scheduler, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """SiD/SFD generator loss (weighted sum, scalar) and its per-row values (B,)."""
    pids = batch["pids"]
    x_g = generator(batch["z"], batch["noises"], emb[pids]).float()
    t = batch["t"]
    a = scheduler.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)
    x_t = scheduler.add_noise(x_g, batch["noise"], t)
    kind = scheduler.config.prediction_type
    uncond = emb[torch.zeros_like(pids)]
    y_fake = pred_x0(guided_output(fake, x_t, t, emb[pids], uncond, cfg.sfd.guidance).float(), x_t, a, kind)
    real_out = guided_output(teacher, x_t, t, emb[batch["teacher_pids"]], emb[batch["neg_pids"]], cfg.sfd.guidance)
    y_real = pred_x0(real_out.float(), x_t, a, kind)
    with torch.no_grad():
        w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    diff = y_real - y_fake
    per_row = (diff * ((y_real - x_g) - cfg.sfd.alpha * diff) / w).sum(dim=(1, 2, 3))
    return (per_row * batch["weight"]).sum(), per_row.detach()


# ----------------------------------------------------------------------------------------------
# Training loop


@dataclass
class SfdTraining:
    """What every SFD step reads: G (`generator`, a FewStepGenerator around the student) and F
    (`fake`) as `accelerator.prepare` returned them, their Adam optimisers, the frozen teacher,
    the prompt embeddings on the device and the latent shape (C, h, w)."""

    cfg: FinetuneConfig
    accelerator: Any
    data: TrainingData
    scheduler: Any  # diffusers DDPMScheduler of the teacher's config
    teacher: nn.Module
    generator: nn.Module
    fake: nn.Module
    g_opt: Any
    f_opt: Any
    emb: torch.Tensor
    shape: tuple[int, int, int]
    ckpt_dir: Path

    def local(self, batch: dict[str, torch.Tensor], micro: int) -> dict[str, torch.Tensor]:
        """This process's micro-batch `micro` (rows of the global batch; noises along dim 1)."""
        n_micro = self.cfg.gradient_accumulation_steps
        per = len(batch["pids"]) // (self.accelerator.num_processes * n_micro)
        first = (self.accelerator.process_index * n_micro + micro) * per
        rows = slice(first, first + per)
        return {k: (v[:, rows] if k == "noises" else v[rows]).to(self.accelerator.device) for k, v in batch.items()}


def _check_inputs(data: TrainingData, cfg: FinetuneConfig) -> None:
    if cfg.mode != "sfd":
        raise ConfigError(f"train_onestep needs finetune.mode=sfd, got {cfg.mode!r}")
    if len(data.retain_pids) == 0 and cfg.sfd.remain_weight > 0:
        raise ConfigError("finetune.mode=sfd: no retain prompts; set finetune.retain_prompts=[...]")
    if len(data.forget_pids) == 0 and cfg.sfd.forget_weight > 0:
        raise ConfigError(
            "finetune.mode=sfd needs forget prompts; pass --erase CONCEPT (or finetune.sfd.forget_weight=0)"
        )


def _check_batch(cfg: FinetuneConfig, world: int) -> None:
    n_r = cfg.batch_size if cfg.sfd.remain_weight > 0 else 0
    n_f = cfg.upper_batch_size if cfg.sfd.forget_weight > 0 else 0
    if (n_r + n_f) % (world * cfg.gradient_accumulation_steps):
        raise ConfigError(
            f"finetune.mode=sfd: batch_size + upper_batch_size = {n_r + n_f} must be divisible by processes ({world}) "
            f"x gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
        )


def build_sfd(student, teacher, data, cfg: FinetuneConfig, scheduler_config: dict, out_dir: Path) -> SfdTraining:
    """Check the inputs, start the Accelerator, make G and F and prepare them with their optimisers."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    _check_inputs(data, cfg)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device = accelerator.device
    scheduler = DDPMScheduler.from_config(scheduler_config)
    kind = scheduler.config.prediction_type
    pred_x0(torch.zeros(1), torch.zeros(1), 0.5, kind)  # refuses an unsupported prediction type early
    _check_batch(cfg, accelerator.num_processes)
    teacher = teacher.to(device).eval().requires_grad_(False)
    fake = copy.deepcopy(teacher if cfg.sfd.fake_init == "teacher" else student).to(device).train()
    fake.requires_grad_(True)
    student = student.to(device).train()
    student.requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        fake.enable_gradient_checkpointing()
    generator = FewStepGenerator(student, cfg.sfd.schedule, scheduler.alphas_cumprod, kind)
    adam = dict(betas=(0.0, 0.999), eps=1e-8)
    g_opt = torch.optim.Adam(student.parameters(), lr=cfg.sfd.generator_lr, **adam)
    f_opt = torch.optim.Adam(fake.parameters(), lr=cfg.sfd.fake_lr, **adam)
    generator, fake, g_opt, f_opt = accelerator.prepare(generator, fake, g_opt, f_opt)
    shape = (student.config.in_channels, student.config.sample_size, student.config.sample_size)
    return SfdTraining(
        cfg=cfg,
        accelerator=accelerator,
        data=data,
        scheduler=scheduler,
        teacher=teacher,
        generator=generator,
        fake=fake,
        g_opt=g_opt,
        f_opt=f_opt,
        emb=data.emb.to(device),
        shape=shape,
        ckpt_dir=out_dir / CHECKPOINTS,
    )


def _check(tr: SfdTraining, value: float, what: str, step: int) -> None:
    cfg = tr.cfg
    if not math.isfinite(value) or abs(value) > cfg.max_loss:
        good = latest_checkpoint(tr.ckpt_dir)
        raise TrainingDivergedError(
            f"finetune sfd diverged at step {step}: {what} loss = {value:.4g} (finetune.max_loss={cfg.max_loss}); "
            f"last good checkpoint: {good or 'none'}. Lower finetune.sfd.generator_lr/sfd.fake_lr or raise max_loss"
        )


def _run_step(tr: SfdTraining, step: int, net, optimizer, stream: int, loss_fn) -> dict[str, float]:
    """Accumulate one loss over this process's micro-batches, step `optimizer`; returns the
    global loss and its retain / forget parts."""
    accelerator, n_micro = tr.accelerator, tr.cfg.gradient_accumulation_steps
    optimizer.zero_grad(set_to_none=True)
    batch = sfd_batch(tr.data, tr.cfg, step, stream, tr.shape)
    parts = torch.zeros(3, device=accelerator.device)
    for micro in range(n_micro):
        mb = tr.local(batch, micro)
        with contextlib.nullcontext() if micro == n_micro - 1 else accelerator.no_sync(net):
            with accelerator.autocast():
                loss, per_row = loss_fn(mb)
            # DDP averages gradients over processes; each holds a part of the global sum
            accelerator.backward(loss * accelerator.num_processes)
        weighted = per_row * mb["weight"]
        parts += torch.stack([weighted.sum(), weighted[mb["is_retain"]].sum(), weighted[~mb["is_retain"]].sum()])
    total, remain, forget = accelerator.reduce(parts, reduction="sum").tolist()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": total, "remain": remain, "forget": forget}


def fake_step(tr: SfdTraining, step: int) -> dict[str, float]:
    """One step of F on L_F (G frozen)."""
    g_plain = tr.accelerator.unwrap_model(tr.generator)

    def loss_fn(mb):
        return fake_score_loss(tr.fake, g_plain, mb, tr.emb, tr.scheduler, tr.cfg)

    record = _run_step(tr, step, tr.fake, tr.f_opt, 0, loss_fn)
    _check(tr, record["loss"], "fake score", step)
    return record


def generator_step(tr: SfdTraining, step: int) -> dict[str, float]:
    """One step of G on L_G; F is read, not trained, here: no parameter gradients."""
    f_plain = tr.accelerator.unwrap_model(tr.fake)

    def loss_fn(mb):
        return generator_loss(tr.generator, f_plain, tr.teacher, mb, tr.emb, tr.scheduler, tr.cfg)

    f_plain.requires_grad_(False)
    try:
        record = _run_step(tr, step, tr.generator, tr.g_opt, 1, loss_fn)
    finally:
        f_plain.requires_grad_(True)
    _check(tr, record["loss"], "generator", step)
    return record


def train_onestep(
    student,
    teacher,
    data,
    cfg: FinetuneConfig,
    scheduler_config: dict,
    out_dir: Path,
    progress: bool = False,
    stop_after: int | None = None,
):
    """Train the generator G (= `student`, in place) by SFD against the frozen `teacher`.

    data: `TrainingData` (only emb and the pid lists are read). Writes `out_dir/losses.jsonl` and
    `out_dir/checkpoints/`, resuming from the latest checkpoint there; `stop_after` ends after that
    many steps of this call (tests simulate a killed run). Returns (G's UNet in eval mode, summary).
    """
    from tqdm.auto import tqdm

    tr = build_sfd(student, teacher, data, cfg, scheduler_config, out_dir)
    accelerator, losses_file = tr.accelerator, out_dir / LOSSES_FILE
    start = load_checkpoint(accelerator, tr.ckpt_dir)
    if accelerator.is_main_process:
        restart_losses(losses_file, start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    desc, show = f"finetune sfd ({len(cfg.sfd.schedule)}-step)", progress and accelerator.is_main_process
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=desc, disable=not show)
    started = time.perf_counter()
    last_record: dict = {}
    for step in bar:
        fake_record = fake_step(tr, step)
        g_record = generator_step(tr, step)
        record = {**{f"fake_{k}": v for k, v in fake_record.items()}, **{f"g_{k}": v for k, v in g_record.items()}}
        last_record = {"step": step, **{k: round(v, 6) for k, v in record.items()}}
        if accelerator.is_main_process:
            append_loss(losses_file, last_record)
        bar.set_postfix({"fake": f"{fake_record['loss']:.3f}", "G": f"{g_record['loss']:.3f}"})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(accelerator, tr.ckpt_dir, step + 1)
    wall = time.perf_counter() - started
    accelerator.wait_for_everyone()
    generator = accelerator.unwrap_model(tr.generator).unet
    if cfg.gradient_checkpointing:
        generator.disable_gradient_checkpointing()
    summary = {
        "mode": "sfd",
        "steps": cfg.steps,
        "generator_timesteps": cfg.sfd.schedule,
        "fake_init": cfg.sfd.fake_init,
        "resumed_at": start,
        "processes": accelerator.num_processes,
        "wall_s": round(wall, 2),
        "final": last_record,
    }
    return generator.eval(), summary
