"""`train`: the distill / sequential / bilevel / bilevel-penalty loop (the package docstring says
what each mode does), resumable from its checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

from toolchain.config import FinetuneConfig
from toolchain.finetune.checkpoints import LOSSES_FILE, append_loss, load_checkpoint, restart_losses, save_checkpoint
from toolchain.finetune.data import TrainingData
from toolchain.finetune.penalty import penalty_step
from toolchain.finetune.state import Training, build_training
from toolchain.finetune.steps import lower_step, upper_step


def take_step(tr: Training, step: int) -> dict[str, float]:
    """Step `step` of the mode: every step a lower one, an upper one, both, or BOME's."""
    cfg = tr.cfg
    if cfg.mode == "bilevel-penalty":
        return penalty_step(tr, step)
    if cfg.mode == "sequential" and step >= cfg.steps - cfg.sequential_unlearn_steps:
        return upper_step(tr, step)
    record = lower_step(tr, step, tr.model, tr.lower_opt, 0)
    if cfg.mode == "bilevel" and (step + 1) % cfg.upper_every == 0:
        record.update(upper_step(tr, step))
    return record


def _summary(tr: Training, start: int, wall: float, last_record: dict) -> dict:
    cfg = tr.cfg
    summary = {
        "mode": cfg.mode,
        "objective": cfg.objective if cfg.unlearns else None,
        "steps": cfg.steps,
        "resumed_at": start,
        "processes": tr.accelerator.num_processes,
        "wall_s": round(wall, 2),
        "feature_kd_blocks": {k: list(v) for k, v in tr.kd_widths.items()},
        "final": last_record,
    }
    if tr.robust:  # the robust option's extra cost, inside wall_s
        summary["robust"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in tr.robust_cost.items()}
    return summary


def train(
    student,
    teacher,
    data: TrainingData,
    cfg: FinetuneConfig,
    scheduler_config: dict,
    out_dir: Path,
    progress: bool = False,
    stop_after: int | None = None,
    prompt_encoder=None,
):
    """Train `student` (in place, also returned) against the frozen `teacher`.

    prompt_encoder: a `toolchain.attacks.PromptEncoder` of the teacher's text encoder; needed by
    `robust` (the attack optimises prefix tokens through it).

    Writes `out_dir/losses.jsonl` and `out_dir/checkpoints/`, resuming from the latest checkpoint
    there. `stop_after`: end after that many steps of this call (tests simulate a killed run).
    Returns (student, summary dict).
    """
    from tqdm.auto import tqdm

    tr = build_training(student, teacher, data, cfg, scheduler_config, out_dir, prompt_encoder)
    accelerator, losses_file = tr.accelerator, out_dir / LOSSES_FILE
    start = load_checkpoint(accelerator, tr.ckpt_dir)
    if accelerator.is_main_process:
        restart_losses(losses_file, start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    show = progress and accelerator.is_main_process
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=f"finetune {cfg.mode}", disable=not show)
    started = time.perf_counter()
    last_record: dict[str, float] = {}
    for step in bar:
        record = take_step(tr, step)
        last_record = {"step": step, **{k: round(v, 6) for k, v in record.items()}}
        if accelerator.is_main_process:
            append_loss(losses_file, last_record)
        bar.set_postfix({k: f"{v:.4f}" for k, v in record.items() if k in ("lower", "upper")})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(accelerator, tr.ckpt_dir, step + 1)
    wall = time.perf_counter() - started
    accelerator.wait_for_everyone()
    student = tr.unwrapped.unet
    if cfg.gradient_checkpointing:
        student.disable_gradient_checkpointing()
    return student.eval(), _summary(tr, start, wall, last_record)
