"""The PyTorch backend: a diffusers pipeline as a `Generator`."""

from __future__ import annotations

import numpy as np

from toolchain.runtime.sampler import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, Generator


def diffusers_generator(
    pipe,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
    schedule: dict | None | str = "auto",
) -> Generator:
    """Wrap a diffusers text-to-image pipeline as a `Generator`.

    All initial latents of a call come from one CPU torch.Generator seeded with `seed`, in prompt
    order, so image i depends only on (seed, i, prompt) and not on `batch_size`.

    schedule: a k-step generator's schedule (`toolchain.onestep`, finetune.mode=sfd): the UNet runs
    once per step without guidance and `steps` / `guidance_scale` are ignored. "auto" reads it from
    the folder the pipeline was loaded from (its `onestep.json`); None samples as a diffusion model.
    """
    import torch

    pipe.set_progress_bar_config(disable=True)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h = height or pipe.unet.config.sample_size * vae_scale
    w = width or pipe.unet.config.sample_size * vae_scale
    if schedule == "auto":
        from toolchain.runtime.schedule import read_schedule

        schedule = read_schedule(getattr(pipe, "name_or_path", None))
    if schedule is not None:
        return _generator_sampler(pipe, schedule, batch_size, h // vae_scale, w // vae_scale)

    def generate(prompts: list[str], seed: int) -> np.ndarray:
        shape = (len(prompts), pipe.unet.config.in_channels, h // vae_scale, w // vae_scale)
        latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                images = pipe(
                    prompt=batch,
                    latents=latents[start : start + len(batch)].to(pipe.device, pipe.unet.dtype),
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=h,
                    width=w,
                    output_type="np",
                ).images
                out.append(np.asarray(images, dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, h, w, 3), np.float32)

    return generate


def _generator_sampler(pipe, schedule: dict, batch_size: int, latent_h: int, latent_w: int) -> Generator:
    """`diffusers_generator` for a k-step generator: x0 = G at each of schedule["timesteps"]
    (`toolchain.runtime.schedule.generator_sample`), decoded by the VAE; noise as `generator_noise` draws it."""
    import torch

    from toolchain.runtime.schedule import generator_noise, generator_sample

    timesteps = schedule["timesteps"]
    prediction_type = schedule.get("prediction_type", pipe.scheduler.config.prediction_type)
    alphas = pipe.scheduler.alphas_cumprod
    unet, vae, device = pipe.unet, pipe.vae, pipe.device

    def call(x_t, t, emb):
        return unet(x_t.to(device, unet.dtype), torch.full((len(x_t),), t, device=device), encoder_hidden_states=emb)[0]

    def generate(prompts: list[str], seed: int) -> np.ndarray:
        shape = (unet.config.in_channels, latent_h, latent_w)
        z, noises = generator_noise(len(prompts), shape, len(timesteps), seed)
        out = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                emb = pipe.encode_prompt(batch, device, 1, do_classifier_free_guidance=False)[0]
                stop = start + len(batch)
                x0 = generator_sample(
                    call,
                    z[start:stop].to(device),
                    noises[:, start:stop].to(device),
                    emb,
                    timesteps,
                    alphas,
                    prediction_type,
                )
                image = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample.float()
                out.append((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())
        size = (
            latent_h * 2 ** (len(vae.config.block_out_channels) - 1),
            latent_w * 2 ** (len(vae.config.block_out_channels) - 1),
        )
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, *size, 3), np.float32)

    return generate
