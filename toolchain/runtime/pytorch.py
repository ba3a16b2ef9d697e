"""The PyTorch backend: a diffusers text-to-image pipeline (its text encoder and tokenizer through
`pipe.encode_prompt`, its UNet, VAE and own scheduler, on whatever device it sits) sampled through
`toolchain.runtime.sampler.sample`, drawing the images `pipe(...)` draws from the same latents."""

from __future__ import annotations

import numpy as np

from toolchain.runtime.sampler import DEFAULT_BATCH_SIZE, DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, Generator, sample


class DiffusersBackend:
    """A diffusers pipeline as a `toolchain.runtime.sampler.Backend`. The pipeline's components
    are looked up at every call, so a caller that swaps `pipe.unet` samples the new one.

    schedule: a k-step generator's schedule (`onestep.json`) or None for a diffusion model."""

    def __init__(self, pipe, height: int | None = None, width: int | None = None, schedule: dict | None = None):
        if getattr(pipe, "safety_checker", None) is not None:
            raise ValueError(
                "the pipeline has a safety checker, which the sampler does not run; "
                "load it with safety_checker=None (toolchain.models.io.load_pipeline does)"
            )
        if pipe.unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("a UNet conditioned on a guidance embedding (time_cond_proj_dim, LCM) is not supported")
        self.pipe, self.schedule = pipe, schedule
        vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        h = height or pipe.unet.config.sample_size * vae_scale
        w = width or pipe.unet.config.sample_size * vae_scale
        self.image_size = (h, w)
        self.latent_shape = (pipe.unet.config.in_channels, h // vae_scale, w // vae_scale)

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def scaling_factor(self) -> float:
        return self.pipe.vae.config.scaling_factor

    @property
    def device(self):
        return self.pipe._execution_device

    @property
    def dtype(self):
        return self.pipe.unet.dtype

    def encode(self, prompts: list[str], guided: bool):
        """[negative; prompt] embeddings as the pipeline concatenates them (empty negative prompts)."""
        import torch

        cond, uncond = self.pipe.encode_prompt(prompts, self.device, 1, do_classifier_free_guidance=guided)
        return torch.cat([uncond, cond]) if guided else cond

    def unet(self, sample, t, embeddings):
        """t: a scheduler timestep tensor, passed as the pipeline passes it, or a k-step generator's int."""
        import torch

        if not torch.is_tensor(t):
            t = torch.full((len(sample),), t, device=self.device)
        unet = self.pipe.unet
        return unet(sample.to(self.device, unet.dtype), t, encoder_hidden_states=embeddings, return_dict=False)[0]

    def decode(self, latents):
        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


def diffusers_generator(
    pipe,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    height: int | None = None,
    width: int | None = None,
    schedule: dict | None | str = "auto",
) -> Generator:
    """Wrap a diffusers text-to-image pipeline as a `Generator`.

    All initial latents of a call come from one CPU torch.Generator seeded with `seed`, in prompt
    order, so image i depends only on (seed, i, prompt) and not on `batch_size`. Classifier-free
    guidance applies where the pipeline applies it (guidance_scale > 1).

    schedule: a k-step generator's schedule (`toolchain.runtime.schedule`, finetune.mode=sfd): the
    UNet runs once per step without guidance and `steps` / `guidance_scale` are ignored. "auto"
    reads it from the folder the pipeline was loaded from (its `onestep.json`); None samples as a
    diffusion model.
    """
    if schedule == "auto":
        from toolchain.runtime.schedule import read_schedule

        schedule = read_schedule(getattr(pipe, "name_or_path", None))
    backend = DiffusersBackend(pipe, height, width, schedule)
    guidance = guidance_scale if guidance_scale > 1 else None

    def generate(prompts: list[str], seed: int) -> np.ndarray:
        return sample(backend, list(prompts), seed, steps, guidance, batch_size)

    return generate
