"""The k-step generator schedule (`onestep.json`, finetune.mode=sfd) and the diffusion maths every
sampler and trainer shares: x0 from a model output, the training target of a prediction type.

Generator with timesteps t_1 > ... > t_k (k = 1: one step), as SiD's sampler:
    x = sqrt(1 - a_1)·z,  z ~ N(0, I)                        (x_0 = 0 noised to t_1)
    x0 = pred_x0(G(x, t_1, c), x, t_1)
    i = 2..k:  x = sqrt(a_i)·x0 + sqrt(1 - a_i)·e_i,  x0 = pred_x0(G(x, t_i, c), x, t_i)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SCHEDULE_FILE = "onestep.json"


def read_schedule(folder) -> dict | None:
    """The generator schedule a pipeline folder (diffusers, ONNX, ORT) carries, or None.

    {"timesteps": [625], "prediction_type": "epsilon", "guidance": "distilled", "method": "sfd"}"""
    if not folder:
        return None
    path = Path(folder) / SCHEDULE_FILE
    if not path.is_file():
        return None
    schedule = json.loads(path.read_text())
    timesteps = schedule.get("timesteps")
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:], strict=False)):
        raise ValueError(f"{path}: 'timesteps' must be a non-empty, strictly decreasing list, got {timesteps!r}")
    return schedule


def write_schedule(folder: Path, timesteps: list[int], prediction_type: str, **extra) -> dict:
    schedule = {
        "timesteps": [int(t) for t in timesteps],
        "prediction_type": prediction_type,
        "guidance": "distilled",  # sample without classifier-free guidance: one UNet call per step
        "method": "sfd",
        **extra,
    }
    (Path(folder) / SCHEDULE_FILE).write_text(json.dumps(schedule, indent=1) + "\n")
    return schedule


def pred_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar, prediction_type: str) -> torch.Tensor:
    """x0 estimate from a UNet output at x_t; alpha_bar: ᾱ_t as a float or a (B, 1, 1, 1) tensor."""
    a = torch.as_tensor(alpha_bar, dtype=torch.float32, device=x_t.device)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "v_prediction":
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction")


def generator_noise(n: int, shape: tuple[int, ...], steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z (n, *shape) and the re-noising draws (steps − 1, n, *shape) from one CPU generator seeded
    with `seed`: z first, so z equals the initial latents a multi-step runner draws for the same seed."""
    g = torch.Generator("cpu").manual_seed(seed)
    z = torch.randn((n, *shape), generator=g, dtype=torch.float32)
    return z, torch.randn((steps - 1, n, *shape), generator=g, dtype=torch.float32)


def generator_sample(unet_fn, z, noises, emb, timesteps, alphas_cumprod, prediction_type: str) -> torch.Tensor:
    """x0 latents (B, C, h, w) of the k-step generator. unet_fn(x_t (B, C, h, w), t: int, emb (B, L, D))
    -> model output; z (B, C, h, w); noises (k − 1, B, C, h, w); alphas_cumprod (T,)."""
    x0 = torch.zeros_like(z)
    for i, t in enumerate(timesteps):
        a = float(alphas_cumprod[int(t)])
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * (z if i == 0 else noises[i - 1])
        x0 = pred_x0(unet_fn(x_t, int(t), emb).float(), x_t, a, prediction_type)
    return x0


def diffusion_target(scheduler, x0, noise, t):
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"prediction_type {scheduler.config.prediction_type!r} is not supported; use epsilon or v")
