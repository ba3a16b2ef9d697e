"""Stage `finetune`: distil the pruned student from the unpruned teacher while unlearning the
`--erase` concepts, or (`finetune.mode=sfd`) turn it into a k-step generator that forgets them.

The method, its modes and its settings are described in `toolchain.finetune`; this adapter loads
the teacher (the run's source, `ctx.chain[0]`) and the student (the input's UNet), takes the
teacher's samples from the cross-run cache (made there once per teacher, prompts and sampler
settings; every process of a multi-process launch draws its share), trains in the output folder
(`losses.jsonl` and checkpoints live there while it runs, so a re-run continues) and seals that
folder as a diffusers pipeline: the input's components linked, the trained UNet (with the input's pruning record) written, checkpoints removed, `onestep.json`
beside a k-step generator. In a multi-process launch every process trains and the main one
returns the artifact (the others None).
"""

from __future__ import annotations

import json
import logging
import shutil

from toolchain.artifact import Artifact, folder_size
from toolchain.config import FinetuneConfig, FinetuneSettings
from toolchain.finetune import (
    CHECKPOINTS,
    LOSSES_FILE,
    check_config,
    prepare_data,
    prompt_data,
    retain_prompt_list,
    shared_teacher_samples,
    train,
    train_onestep,
    training_examples,
)
from toolchain.models.io import PRUNING_RECORD, component_params, link_pipeline, load_pipeline, load_unet, save_unet
from toolchain.runtime.schedule import SCHEDULE_FILE, write_schedule

logger = logging.getLogger(__name__)


def run(source: Artifact, settings: FinetuneSettings, ctx) -> Artifact | None:
    """The stage: the distill / sequential / bilevel / bilevel-penalty modes, or SFD."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cfg, erase = settings.finetune, list(settings.erase)
    if cfg.mode == "sfd":
        return _run_sfd(source, cfg, erase, ctx)
    examples = training_examples(cfg, erase)
    # several processes under `accelerate launch` / torchrun: one per device (as Accelerator() sets up)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    teacher_pipe = load_pipeline(ctx.chain[0].files).to(state.device)
    cached = {}

    def sampler(prompts):  # every process draws its share, through the cross-run cache
        latents, cached["teacher_samples"] = shared_teacher_samples(
            teacher_pipe, prompts, cfg, ctx.cache_dir, ctx.chain[0].fingerprint, ctx.progress
        )
        return latents

    data = prepare_data(
        teacher_pipe,
        examples.retain,
        examples.forget,
        cfg,
        None,
        ctx.progress,
        examples.retain_images,
        examples.forget_images,
        sampler=sampler,
    )
    prompt_encoder = None
    if cfg.robust.enabled:
        from toolchain.attacks import PromptEncoder

        prompt_encoder = PromptEncoder(teacher_pipe.text_encoder, teacher_pipe.tokenizer)
    student = load_unet(source.files / "unet")
    scheduler_config = dict(teacher_pipe.scheduler.config)
    student, summary = train(
        student,
        teacher_pipe.unet,
        data,
        cfg,
        scheduler_config,
        ctx.out_dir,
        ctx.progress,
        prompt_encoder=prompt_encoder,
    )
    if not state.is_main_process:
        return None  # the main process writes the artifact
    summary.update(
        erase=erase,
        retain_prompts=len(examples.retain),
        forget_prompts=len(examples.forget),
        retain_images=len(examples.retain_images),
        forget_images=len(examples.forget_images),
        **cached,
    )
    return _seal(source, ctx.out_dir, student, summary, skip=())


def _run_sfd(source: Artifact, cfg: FinetuneConfig, erase: list[str], ctx) -> Artifact | None:
    """finetune.mode=sfd: the student becomes a k-step generator that also forgets `erase`."""
    from accelerate import PartialState

    concepts = check_config(cfg, erase)
    retain = retain_prompt_list(cfg, concepts)
    forget = [(p, c.anchor_prompt) for c in concepts for p in c.erase_prompts]
    teacher_pipe = load_pipeline(ctx.chain[0].files)
    data = prompt_data(teacher_pipe, retain, forget)
    scheduler_config = dict(teacher_pipe.scheduler.config)
    student = load_unet(source.files / "unet")
    generator, summary = train_onestep(
        student, teacher_pipe.unet, data, cfg, scheduler_config, ctx.out_dir, ctx.progress
    )
    if not PartialState().is_main_process:  # the state train_onestep's Accelerator set up
        return None
    write_schedule(ctx.out_dir, cfg.sfd.schedule, scheduler_config.get("prediction_type", "epsilon"))
    summary.update(erase=erase, retain_prompts=len(retain), forget_prompts=len(forget))
    return _seal(source, ctx.out_dir, generator, summary, skip=(SCHEDULE_FILE,))


def _seal(source: Artifact, out, unet, summary: dict, skip: tuple[str, ...]) -> Artifact:
    """Make `out` the trained pipeline: the input's other components linked (not `skip`, which the
    stage wrote), the UNet saved with the input's pruning record, the checkpoints removed."""
    link_pipeline(source.files, out, skip=("unet", LOSSES_FILE, CHECKPOINTS, *skip))
    record_file = source.files / "unet" / PRUNING_RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else None
    save_unet(unet, out / "unet", record)
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)  # the sealed folder is a pipeline, not a run
    logger.info("finetune: %s done in %.1f s: %s", summary["mode"], summary["wall_s"], summary["final"])
    return Artifact(
        path=out,
        kind="diffusers",
        records={"finetune": summary},
        metrics={"params": component_params(out), "size_bytes": folder_size(out)},
    )
