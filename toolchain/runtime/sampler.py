"""The one text-to-image sampler every runtime runs through, and what it returns: a `Generator`,
`generate(prompts, seed) -> images` (N, H, W, 3) floats in [0, 1], one image per prompt.

A runtime plugs in as a `Backend` (the text encoder, the UNet and the VAE decoder of one loaded
pipeline, plus its scheduler); `sample` holds everything else, written once so PyTorch, ONNX
Runtime and the phone runtimes draw the same images from the same seed:

- initial noise: one CPU torch.Generator seeded with `seed` draws the latents of all prompts at
  once, in prompt order, so image i depends on (seed, i, prompt) and never on `batch_size`;
- a diffusion model: the scheduler loop with classifier-free guidance, the UNet at batch 2N on
  [unconditional; conditional] embeddings, guided = uncond + s·(cond − uncond), as diffusers'
  StableDiffusionPipeline orders and computes it;
- a k-step generator (the backend's `schedule`, read from `onestep.json`): the UNet once per step
  at batch N without guidance (`toolchain.runtime.schedule.generator_sample`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

Generator = Callable[[list[str], int], np.ndarray]
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE_SCALE = 5.0  # the digits-world recipe value; see toolchain/assets/digits-sd/README.md
DEFAULT_BATCH_SIZE = 64  # prompts per UNet call group (the guided UNet sees twice that)


class Backend(Protocol):
    """One loaded pipeline in one runtime. Tensors are torch tensors on `device`.

    encode(prompts, guided) -> text embeddings (2N, L, D) [unconditional; conditional] when
        guided, else (N, L, D)
    unet(sample (B, C, h, w), t, embeddings (B, L, D)) -> model output (B, C, h, w); t is a
        scheduler timestep (0-d tensor) or an int (k-step generator)
    decode(latents (N, C, h, w), already divided by `scaling_factor`) -> images (N, 3, H, W) in [-1, 1]
    """

    scheduler: Any  # a diffusers scheduler built from the folder's scheduler config
    latent_shape: tuple[int, int, int]  # (C, h, w)
    image_size: tuple[int, int]  # (H, W)
    scaling_factor: float  # the VAE's
    device: Any
    dtype: Any  # of the latents the UNet takes
    schedule: dict | None  # a k-step generator's schedule (onestep.json), or None for a diffusion model

    def encode(self, prompts: list[str], guided: bool) -> torch.Tensor: ...

    def unet(self, sample: torch.Tensor, t: Any, embeddings: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def sample(
    backend: Backend,
    prompts: list[str],
    seed: int,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float | None = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> np.ndarray:
    """Images (N, H, W, 3) float32 in [0, 1], one per prompt, drawn `batch_size` prompts at a time.

    guidance_scale None: no classifier-free guidance (the UNet at batch N). A backend with a k-step
    generator `schedule` ignores `steps` and `guidance_scale`."""
    import torch

    chunks = range(0, len(prompts), batch_size)
    with torch.inference_mode():
        if backend.schedule is not None:
            images = _generator_images(backend, prompts, seed, chunks, batch_size)
        else:
            noise = torch.randn(
                (len(prompts), *backend.latent_shape),
                generator=torch.Generator("cpu").manual_seed(seed),
                dtype=torch.float32,
            )
            images = [
                _denoise(backend, prompts[i : i + batch_size], noise[i : i + batch_size], steps, guidance_scale)
                for i in chunks
            ]
    if not images:
        return np.zeros((0, *backend.image_size, 3), np.float32)
    return np.concatenate(images).astype(np.float32)


def _denoise(backend: Backend, prompts: list[str], noise, steps: int, guidance_scale: float | None) -> np.ndarray:
    """One chunk through the scheduler loop; noise (n, C, h, w) float32 on the CPU."""
    import inspect

    import torch

    scheduler, guided = backend.scheduler, guidance_scale is not None
    embeddings = backend.encode(prompts, guided)
    scheduler.set_timesteps(steps, device=backend.device)  # resets multistep state (PNDM, DPM-Solver) per chunk
    latents = noise.to(backend.device, backend.dtype) * scheduler.init_noise_sigma
    # deterministic sampling, as diffusers' pipeline asks of schedulers that take eta (TCD defaults to 0.3)
    step_kwargs = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
        output = backend.unet(model_input, t, embeddings)
        if guided:
            uncond, cond = output.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
    return _to_images(backend.decode(latents / backend.scaling_factor))


def _generator_images(backend: Backend, prompts: list[str], seed: int, chunks, batch_size: int) -> list[np.ndarray]:
    """The k-step generator: x0 = G at each of schedule["timesteps"], decoded; noise as
    `generator_noise` draws it (z first, so z equals the diffusion sampler's initial latents)."""
    from toolchain.runtime.schedule import generator_noise, generator_sample

    timesteps = backend.schedule["timesteps"]
    prediction_type = backend.schedule.get("prediction_type", backend.scheduler.config.prediction_type)
    z, noises = generator_noise(len(prompts), backend.latent_shape, len(timesteps), seed)
    images = []
    for start in chunks:
        stop = min(start + batch_size, len(prompts))
        x0 = generator_sample(
            backend.unet,
            z[start:stop].to(backend.device),
            noises[:, start:stop].to(backend.device),
            backend.encode(prompts[start:stop], False),
            timesteps,
            backend.scheduler.alphas_cumprod,
            prediction_type,
        )
        images.append(_to_images(backend.decode(x0 / backend.scaling_factor)))
    return images


def _to_images(decoded) -> np.ndarray:
    """VAE output (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) in [0, 1], as diffusers' image processor."""
    return (decoded * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
