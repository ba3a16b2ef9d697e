"""All-but-One (Hong et al., AAAI 2024) — a RECONSTRUCTION: the paper has no public code.

Edit only the guidance term of the target concept toward a replacement concept and keep the
unconditional score where the teacher has it:

    L = MSE(S(x_t, c_tgt) − S(x_t, ∅), sg[T(x_t, c_rep) − T(x_t, ∅)]) + β·MSE(S(x_t, ∅), sg[T(x_t, ∅)])

c_rep = `ConceptConfig.anchor_prompt`, β = `finetune.all_but_one.beta` (1.0; the paper leaves it open).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.unlearning import ForgetBatch, register_objective


@register_objective("all-but-one")
def all_but_one_loss(student, teacher, batch: ForgetBatch, settings) -> torch.Tensor:
    with torch.no_grad():
        t_uncond = teacher(batch.x_t, batch.t, batch.uncond).float()
        t_rep = teacher(batch.x_t, batch.t, batch.anchor).float()
    s_uncond = student(batch.x_t, batch.t, batch.uncond).float()
    s_cond = student(batch.x_t, batch.t, batch.cond).float()
    guidance = F.mse_loss(s_cond - s_uncond, t_rep - t_uncond)
    return guidance + settings.beta * F.mse_loss(s_uncond, t_uncond)
