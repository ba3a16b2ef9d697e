"""Stage `decoder` (decoder.enabled=true): replace the pipeline's VAE by a distilled tiny one.

Adapter over `toolchain.finetune.decoder`: the latents are the teacher samples of the run's source
(the prompts and sampler settings finetune uses, from the cross-run cache: after finetune a hit),
the teacher is the input's own VAE (loaded alone). Output: the input pipeline with `vae/` an AutoencoderTiny
(model_index.json names it), so every later stage and target exports and measures it like any VAE;
the manifest records the held-out PSNR against the VAE it replaced and both decoders' parameters.
"""

from __future__ import annotations

import json

from toolchain.artifact import Artifact, folder_size
from toolchain.config import DecoderSettings


def run(source: Artifact, settings: DecoderSettings, ctx) -> Artifact:
    from diffusers import AutoencoderKL

    from toolchain.finetune import sampled_prompts, shared_teacher_samples, training_examples
    from toolchain.finetune.decoder import distill_decoder
    from toolchain.models.io import component_params, link_pipeline, load_pipeline

    examples = training_examples(settings.finetune, list(settings.erase))
    prompts = sampled_prompts(examples.retain, examples.forget, examples.forget_images)
    teacher = load_pipeline(ctx.chain[0].files)
    latents, samples = shared_teacher_samples(
        teacher, prompts, settings.finetune, ctx.cache_dir, ctx.chain[0].fingerprint, ctx.progress
    )
    del teacher
    vae = AutoencoderKL.from_pretrained(source.files / "vae", use_safetensors=True, local_files_only=True)
    student, summary = distill_decoder(vae, latents, settings.decoder, ctx.progress)
    link_pipeline(source.files, ctx.out_dir, skip=("vae", "model_index.json"))
    student.save_pretrained(ctx.out_dir / "vae")
    index = json.loads((source.files / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderTiny"]
    (ctx.out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    summary["teacher_samples"] = samples
    return Artifact(
        path=ctx.out_dir,
        kind="diffusers",
        records={"decoder": summary},
        metrics={"params": component_params(ctx.out_dir), "size_bytes": folder_size(ctx.out_dir)},
    )
