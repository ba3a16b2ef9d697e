"""The lower level's losses: block features, the student with its feature projections, min-SNR
weights and the denoising loss (L_ft = w_diff·L_diff + w_out·L_outKD + w_feat·L_featKD; the
package docstring says what each term is)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from toolchain.finetune.data import TrainingData

logger = logging.getLogger(__name__)


def block_names(unet) -> list[str]:
    """The blocks feature KD compares: every down block, the mid block, every up block."""
    names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        names.append("mid_block")
    return names + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


def forward_with_features(unet, names: list[str], x_t, t, emb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """UNet prediction (B, C, h, w) and the output of each named block (first tuple element).

    Hooks live only for this call, so copies of the model never share them."""
    features: dict[str, torch.Tensor] = {}
    modules = dict(unet.named_modules())

    def hook_for(name):
        def hook(module, inputs, output):
            features[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        out = unet(x_t, t, encoder_hidden_states=emb).sample
    finally:
        for handle in handles:
            handle.remove()
    return out, features


class DistillStudent(nn.Module):
    """The student UNet plus one learned 1x1 projection per feature-KD block whose width differs
    from the teacher's (student channels -> teacher channels). Only `unet` is kept at the end."""

    def __init__(self, unet, kd_widths: dict[str, tuple[int, int]]):
        super().__init__()
        self.unet = unet
        self.kd_blocks = list(kd_widths)
        self.projections = nn.ModuleDict(
            {name.replace(".", "_"): nn.Conv2d(s, t, 1) for name, (s, t) in kd_widths.items() if s != t}
        )

    def forward(self, x_t, t, emb, features: bool = True):
        if not features:
            return self.unet(x_t, t, encoder_hidden_states=emb).sample, {}
        out, feats = forward_with_features(self.unet, self.kd_blocks, x_t, t, emb)
        for name in self.kd_blocks:
            key = name.replace(".", "_")
            if key in self.projections:
                feats[name] = self.projections[key](feats[name])
        return out, feats


def kd_block_widths(student, teacher, data: TrainingData, mode: str) -> dict[str, tuple[int, int]]:
    """Blocks compared by L_featKD: name -> (student width, teacher width). Blocks missing in one
    model or with other spatial sizes are skipped; other widths are projected or skipped (`mode`)."""
    x = data.latents[:2]
    t = torch.tensor([500, 500])
    emb = data.emb[[0, 0]]
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    with torch.no_grad():  # every input on its model's device: the timestep too (CUDA)
        names = [n for n in block_names(student) if n in block_names(teacher)]
        _, s_feats = forward_with_features(student, names, x.to(device), t.to(device), emb.to(device))
        tdev = next(teacher.parameters()).device
        _, t_feats = forward_with_features(teacher, list(s_feats), x.to(tdev), t.to(tdev), emb.to(tdev))
    student.train(was_training)
    widths = {}
    for name, s in s_feats.items():
        ref = t_feats[name]
        if s.shape[2:] != ref.shape[2:] or (mode == "matching" and s.shape[1] != ref.shape[1]):
            continue
        widths[name] = (s.shape[1], ref.shape[1])
    skipped = [n for n in s_feats if n not in widths]
    if skipped:
        logger.info("finetune: feature KD skips blocks %s (feature_kd=%s)", skipped, mode)
    return widths


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) min-SNR-γ loss weights (Hang et al. 2023); all ones when γ = 0."""
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    alphas = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alphas / (1 - alphas)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def denoising_loss(pred, target, weights) -> torch.Tensor:
    """Weighted mean over the batch of each sample's MSE; pred, target (B, C, h, w), weights (B,)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def feature_kd_loss(s_feats: dict, t_feats: dict, names, device) -> torch.Tensor:
    """L_featKD: the mean over `names` of each block's MSE; 0 when no block is compared."""
    if not names:
        return torch.zeros((), device=device)
    return torch.stack([F.mse_loss(s_feats[n].float(), t_feats[n].float()) for n in names]).mean()
