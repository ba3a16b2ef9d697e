"""Concept Ablation (Kumari et al., `nupurkmr9/concept-ablation`), model-based variant.

    L = MSE(S(x_t, c_target), sg[S(x_t, c_anchor)])

x_t are forward-noised teacher samples of the *anchor* prompt (the paper uses anchor-concept
images); c_anchor = `ConceptConfig.anchor_prompt`. The paper trains cross-attention K/V: use
trainable subset "cross_attention".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.unlearning import ForgetBatch, register_objective


@register_objective("ablation", latents="anchor")
def ablation_loss(student, teacher, batch: ForgetBatch, settings) -> torch.Tensor:
    with torch.no_grad():
        target = student(batch.x_t, batch.t, batch.anchor)
    return F.mse_loss(student(batch.x_t, batch.t, batch.cond).float(), target.float())
