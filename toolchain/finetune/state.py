"""The state of one `train` call and the plumbing every step shares: the Accelerator, the models
and optimisers it prepared, this process's slice of a global batch, gradient accumulation and
the divergence check."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolchain.config import ConfigError, FinetuneConfig
from toolchain.errors import TrainingDivergedError
from toolchain.finetune.checkpoints import CHECKPOINTS, latest_checkpoint
from toolchain.finetune.data import TrainingData
from toolchain.finetune.losses import DistillStudent, kd_block_widths
from toolchain.runtime.schedule import diffusion_target
from toolchain.unlearning import get_objective, trainable_parameters


@dataclass
class Training:
    """What every step reads. `model` is the DistillStudent as `accelerator.prepare` returned it
    (DDP-wrapped under several processes); `subset` the student parameters an upper step may
    change (`trainable`); `copy_model` the copy bilevel-penalty's inner steps train (else None);
    `prompt_encoder` the teacher's text encoder the robust option attacks through."""

    cfg: FinetuneConfig
    accelerator: Any
    data: TrainingData
    noise_scheduler: Any  # diffusers DDPMScheduler of the teacher's config
    objective: Any  # the upper loss, `toolchain.unlearning.get_objective(cfg.objective)`
    teacher: nn.Module
    model: nn.Module
    kd_widths: dict[str, tuple[int, int]]
    subset: list[nn.Parameter]
    lower_opt: Any
    upper_opt: Any
    ckpt_dir: Path
    copy_model: nn.Module | None = None
    robust: bool = False
    prompt_encoder: Any = None
    robust_cost: dict = field(default_factory=lambda: {"attack_s": 0.0, "attacks": 0, "retain_s": 0.0})

    @property
    def device(self):
        return self.accelerator.device

    @property
    def num_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    @property
    def unwrapped(self) -> DistillStudent:
        return self.accelerator.unwrap_model(self.model)

    def local(self, x: torch.Tensor, micro: int) -> torch.Tensor:
        """This process's micro-batch `micro` of a global batch."""
        n = self.cfg.gradient_accumulation_steps
        per = len(x) // (self.accelerator.num_processes * n)
        first = (self.accelerator.process_index * n + micro) * per
        return x[first : first + per].to(self.device)

    def student_out(self, x_t, t, emb):
        return self.model(x_t, t, emb, features=False)[0]

    def teacher_out(self, x_t, t, emb):
        with torch.no_grad():
            return self.teacher(x_t, t, encoder_hidden_states=emb).sample


def check(tr: Training, value: float, what: str, step: int) -> None:
    """Stop a diverged run, naming the last good checkpoint (kept)."""
    cfg = tr.cfg
    if not math.isfinite(value) or value > cfg.max_loss:
        good = latest_checkpoint(tr.ckpt_dir)
        raise TrainingDivergedError(
            f"finetune diverged at step {step}: {what} loss = {value:.4g} (finetune.max_loss={cfg.max_loss}); "
            f"last good checkpoint: {good or 'none'}. Lower finetune.lower_lr/upper_lr or raise max_loss"
        )


def backward(tr: Training, loss_of_micro, net, scale: float = 1.0) -> float:
    """Accumulate gradients of a loss over the micro-batches; returns the global mean.

    Done here rather than by accelerate's `accumulate`: two objectives share one model and its
    counter assumes one; DDP synchronises only on the last micro-batch."""
    total = 0.0
    n = tr.cfg.gradient_accumulation_steps
    for micro in range(n):
        sync = contextlib.nullcontext() if micro == n - 1 else tr.accelerator.no_sync(net)
        with sync:
            loss = loss_of_micro(micro) / n
            tr.accelerator.backward(loss * scale)
        total += loss.detach()
    return tr.accelerator.reduce(torch.as_tensor(total, device=tr.device).float(), reduction="mean").item()


def lower_lr(cfg: FinetuneConfig, step: int) -> float:
    """The lower learning rate with its linear warm-up."""
    return cfg.lower_lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lower_lr


def _accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    chunks = accelerator.num_processes * cfg.gradient_accumulation_steps
    for name, size in (("batch_size", cfg.batch_size), ("upper_batch_size", cfg.upper_batch_size)):
        if size % chunks:
            raise ConfigError(
                f"finetune.{name}={size} must be divisible by processes ({accelerator.num_processes}) x "
                f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps})"
            )
    return accelerator


def _prepare(accelerator, model: DistillStudent, subset: list, cfg: FinetuneConfig):
    """(model, copy_model, lower_opt, upper_opt) prepared. Two AdamW; bilevel-penalty (BOME): the
    inner one trains the copy's lower variables, the outer one moves all (θ_u and ϑ groups)."""
    adamw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if cfg.mode != "bilevel-penalty":
        lower_opt = torch.optim.AdamW(model.parameters(), lr=cfg.lower_lr, **adamw)
        upper_opt = torch.optim.AdamW(subset, lr=cfg.upper_lr, **adamw)
        model, lower_opt, upper_opt = accelerator.prepare(model, lower_opt, upper_opt)
        return model, None, lower_opt, upper_opt
    subset_ids = {id(p) for p in subset}
    is_upper = [id(p) in subset_ids for p in model.parameters()]
    copy_model = copy.deepcopy(model)
    copy_lower = [c for c, up in zip(copy_model.parameters(), is_upper, strict=True) if not up]
    lower = [p for p, up in zip(model.parameters(), is_upper, strict=True) if not up]
    lower_opt = torch.optim.AdamW(copy_lower, lr=cfg.lower_lr, **adamw)
    groups = [{"params": subset, "lr": cfg.upper_lr}, {"params": lower, "lr": cfg.lower_lr}]
    upper_opt = torch.optim.AdamW(groups, **adamw)
    return accelerator.prepare(model, copy_model, lower_opt, upper_opt)


def build_training(student, teacher, data, cfg, scheduler_config: dict, out_dir: Path, prompt_encoder=None) -> Training:
    """Check the inputs, start the Accelerator, put the models on its device and prepare them."""
    from diffusers import DDPMScheduler

    if cfg.unlearns and len(data.forget_rows) == 0:
        raise ConfigError(f"finetune.mode={cfg.mode} needs forget prompts; pass --erase CONCEPT")
    robust = cfg.robust.enabled and cfg.unlearns
    if robust and (prompt_encoder is None or data.ids is None):
        raise ConfigError(
            "finetune.robust.enabled=true attacks the forget prompts through the text encoder: pass "
            "prompt_encoder=toolchain.attacks.PromptEncoder(...) and data from prepare_data (with ids)"
        )
    accelerator = _accelerator(cfg)
    device = accelerator.device
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    diffusion_target(noise_scheduler, data.latents[:1], data.latents[:1], torch.tensor([0]))  # checks the type
    objective = get_objective(cfg.objective)
    teacher = teacher.to(device).eval().requires_grad_(False)
    student = student.to(device).train()
    student.requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    kd_widths = kd_block_widths(student, teacher, data, cfg.feature_kd) if cfg.w_feat > 0 else {}
    torch.manual_seed(cfg.seed)  # the projections' initialisation
    model = DistillStudent(student, kd_widths).to(device)
    subset = [p for _, p in trainable_parameters(student, cfg.trainable)]
    model, copy_model, lower_opt, upper_opt = _prepare(accelerator, model, subset, cfg)
    if robust:
        prompt_encoder.text_encoder.to(device).requires_grad_(False)
    return Training(
        cfg=cfg,
        accelerator=accelerator,
        data=data,
        noise_scheduler=noise_scheduler,
        objective=objective,
        teacher=teacher,
        model=model,
        kd_widths=kd_widths,
        subset=subset,
        lower_opt=lower_opt,
        upper_opt=upper_opt,
        ckpt_dir=out_dir / CHECKPOINTS,
        copy_model=copy_model,
        robust=robust,
        prompt_encoder=prompt_encoder,
    )
