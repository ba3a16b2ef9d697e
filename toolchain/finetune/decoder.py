"""A tiny VAE decoder distilled from the pipeline's own VAE (stage `decoder`).

After pruning and a one-step generator, the VAE decoder, which no other stage touches, dominates an
image's cost (SD-1.5's decoder is ~1.2 TMAC at 512x512). The student is diffusers'
`AutoencoderTiny` (the TAESD layout: plain 3x3 conv blocks, nearest upsampling, no attention and
no GroupNorm), one level per level of the VAE it replaces, so it reads the same latents and draws
images of the same size; it loads in `StableDiffusionPipeline` as the `vae` and exports like one.

Data: the model's own latents, i.e. the teacher samples finetune trains on (the cross-run cache
holds them, so this costs no sampling after finetune), decoded by the VAE into target images;
`held_out` of them are never trained on and measure the result (PSNR, max abs error). Loss: pixel
L1, plus `structure_weight` x (L1 of horizontal and vertical differences, i.e. edges, and L1 at
2x and 4x average-pooled scales): a perceptual-style term that needs no pretrained network (LPIPS
would download one). Its encoder is distilled too (MSE to the latents the VAE encodes the target
images to), so the folder is a complete VAE for img2img in PyTorch.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from toolchain.config import DecoderConfig

logger = logging.getLogger(__name__)


def tiny_vae(vae, cfg: DecoderConfig):
    """An untrained AutoencoderTiny shaped for `vae` (an AutoencoderKL): same latent channels and
    scale (one level per VAE level), latents taken as the UNet makes them (scaling factor 1)."""
    from diffusers import AutoencoderTiny

    levels = len(vae.config.block_out_channels)
    torch.manual_seed(cfg.seed)
    return AutoencoderTiny(
        in_channels=vae.config.in_channels,
        out_channels=vae.config.out_channels,
        encoder_block_out_channels=(cfg.channels,) * levels,
        decoder_block_out_channels=(cfg.channels,) * levels,
        num_encoder_blocks=(1,) + (cfg.blocks,) * (levels - 1),
        num_decoder_blocks=(cfg.blocks,) * (levels - 1) + (1,),
        latent_channels=vae.config.latent_channels,
        scaling_factor=1.0,
    )


@torch.no_grad()
def vae_images(vae, latents: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """The VAE's images (N, 3, H, W) in [-1, 1] of UNet-space latents (x scaling factor), on the CPU."""
    scale, device = vae.config.scaling_factor, next(vae.parameters()).device
    out = [
        vae.decode(latents[i : i + chunk].to(device, vae.dtype) / scale).sample.float().clamp(-1, 1).cpu()
        for i in range(0, len(latents), chunk)
    ]
    return torch.cat(out)


def structure_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Edges (L1 of neighbour differences) and coarse structure (L1 at 2x and 4x pooled scales)."""
    loss = (pred.diff(dim=-1) - target.diff(dim=-1)).abs().mean() + (
        pred.diff(dim=-2) - target.diff(dim=-2)
    ).abs().mean()
    for factor in (2, 4):
        if min(pred.shape[-2:]) >= factor:
            loss = loss + F.l1_loss(F.avg_pool2d(pred, factor), F.avg_pool2d(target, factor))
    return loss


def decoder_loss(student, latents, images, cfg: DecoderConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Pixel L1 + structure terms of the decoded images, + the encoder's latent MSE."""
    pred = student.decode(latents).sample
    pixel, structure = F.l1_loss(pred, images), structure_loss(pred, images)
    encoder = F.mse_loss(student.encode(images).latents, latents)
    loss = pixel + cfg.structure_weight * structure + cfg.encoder_weight * encoder
    return loss, {"pixel": pixel.item(), "structure": structure.item(), "encoder": encoder.item()}


def _split(n: int, cfg: DecoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    held = max(1, round(n * cfg.held_out))
    if n - held < 1:
        raise ValueError(f"decoder: {n} latents leave none to train on with held_out={cfg.held_out}")
    return order[held:], order[:held]


@torch.no_grad()
def measure(student, latents: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """The student's decode against the VAE's images of the same latents: PSNR (2 = [-1, 1]'s range)
    and max abs error."""
    device = next(student.parameters()).device
    pred = torch.cat(
        [student.decode(latents[i : i + 32].to(device)).sample.float().cpu() for i in range(0, len(latents), 32)]
    )
    mse = F.mse_loss(pred, images).item()
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()
    return {"psnr_db": round(psnr, 2), "max_abs_err": round((pred - images).abs().max().item(), 5), "n": len(latents)}


def distill_decoder(vae, latents: torch.Tensor, cfg: DecoderConfig, progress: bool = False):
    """Train `tiny_vae(vae, cfg)` to draw what `vae` draws from `latents` (N, C, h, w). Returns
    (student on the CPU, summary: steps, wall_s, final losses, held-out PSNR of the student and of
    the untrained student, the VAE's and the student's parameter counts)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    images = vae_images(vae, latents)
    train_rows, held_rows = _split(len(latents), cfg)
    student = tiny_vae(vae, cfg)
    before = measure(student, latents[held_rows], images[held_rows])
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    generator, start, losses = torch.Generator().manual_seed(cfg.seed + 1), time.perf_counter(), {}
    bar = tqdm(range(cfg.steps), desc="decoder", disable=not progress)
    for _ in bar:
        rows = train_rows[torch.randint(len(train_rows), (min(cfg.batch_size, len(train_rows)),), generator=generator)]
        x, y = latents[rows].to(accelerator.device), images[rows].to(accelerator.device)
        with accelerator.autocast():
            loss, losses = decoder_loss(student, x, y, cfg)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    student = accelerator.unwrap_model(student).to("cpu").eval()
    after = measure(student, latents[held_rows], images[held_rows])
    summary = {
        "steps": cfg.steps,
        "wall_s": round(time.perf_counter() - start, 1),
        "final": {k: round(v, 6) for k, v in losses.items()},
        "held_out": after,
        "held_out_untrained": before,
        "vae_decoder_params": sum(p.numel() for p in vae.decoder.parameters()),
        "decoder_params": sum(p.numel() for p in student.decoder.parameters()),
    }
    logger.info(
        "decoder: held-out PSNR %.1f dB (untrained %.1f dB) after %d steps",
        after["psnr_db"],
        before["psnr_db"],
        cfg.steps,
    )
    return student, summary
