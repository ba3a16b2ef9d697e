"""Concept inversion (textual inversion, Gal et al. 2022, used as an attack on erasure by Pham et
al. 2024): one new token embedding v is learned with the denoising loss of the *erased* model on
concept latents, min_v MSE(S(x_t, t, E("<v>")), eps); the erased model then generates from
E("<v>") alone. v exists only as an embedding, so it is measured on PyTorch models only
(`generate_from_embeddings`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from toolchain.attacks.encoder import PromptEncoder


def concept_inversion(
    unet, encoder: PromptEncoder, latents: torch.Tensor, scheduler, steps: int, lr: float, batch: int, seed: int = 0
) -> tuple[torch.Tensor, list[float]]:
    """Learn one token embedding v (D_tok,) so the erased `unet` denoises concept `latents` given
    E("<v>") (the prompt is the new token alone); `steps` Adam steps on the epsilon/v loss.
    Returns v and the loss of every step."""
    from toolchain.runtime.schedule import diffusion_target

    if steps < 0:
        raise ValueError(f"inversion steps={steps}: must be >= 0")
    device = encoder.table.device
    table = encoder.table.detach()
    ids = encoder.ids([""])  # [BOS, EOS, pad...]: v goes where a one-word prompt would
    vector = table[encoder.candidates.to(device)].float().mean(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        rows = torch.randint(len(latents), (batch,), generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        x0 = latents[rows].float().cpu()
        noise = torch.randn(x0.shape, generator=g)
        x_t = scheduler.add_noise(x0, noise, t).to(device)
        target = diffusion_target(scheduler, x0, noise, t).to(device)
        cond = encoder.encode_embeddings(encoder.with_prefix(ids, vector.view(1, 1, -1))).expand(batch, -1, -1)
        pred = unet(x_t, t.to(device), encoder_hidden_states=cond.to(x_t.dtype)).sample.float()
        loss = F.mse_loss(pred, target.float())
        (grad,) = torch.autograd.grad(loss, vector)
        vector.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
    return vector.detach(), history


def generate_from_embeddings(pipe, cond: torch.Tensor, seed: int, steps: int, guidance_scale: float) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] from text embeddings cond (N, L, D), "" as the negative,
    through the runtime sampler `toolchain.runtime.pytorch.diffusers_generator` runs: the same
    initial latents and, for a k-step generator (its folder's onestep.json), its own sampling
    (one unguided UNet call per step; `steps` and `guidance_scale` do not apply)."""
    from toolchain.runtime.sampler import sample
    from toolchain.runtime.schedule import read_schedule

    backend = _EmbeddingBackend(pipe, cond, read_schedule(getattr(pipe, "name_or_path", None)))
    guidance = guidance_scale if guidance_scale > 1 else None
    return sample(backend, [str(i) for i in range(len(cond))], seed, steps, guidance)


class _EmbeddingBackend:
    """A pipeline whose "prompts" are row numbers of fixed text embeddings `cond`."""

    def __init__(self, pipe, cond: torch.Tensor, schedule: dict | None):
        from toolchain.runtime.pytorch import DiffusersBackend

        self.inner = DiffusersBackend(pipe, schedule=schedule)
        self.cond, self.schedule = cond, schedule

    def __getattr__(self, name):  # scheduler, shapes, device, unet, decode: the pipeline's
        return getattr(self.inner, name)

    def encode(self, prompts: list[str], guided: bool) -> torch.Tensor:
        cond = self.cond[[int(p) for p in prompts]].to(self.inner.device, self.inner.dtype)
        if not guided:
            return cond
        return torch.cat([self.inner.encode([""] * len(prompts), False).to(cond.dtype), cond])
