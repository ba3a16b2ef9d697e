"""Score Forgetting Distillation, SFD-style (`tqch/score-forgetting-distillation`), data-free.

    L = MSE(S(x_t, c_forget), sg[T(x_t, c_override)])

The student's score for the forget prompts is pulled to the teacher's score for a safe override
concept (`ConceptConfig.anchor_prompt`) on teacher-generated x_t. The paper does this inside
score-identity distillation to a one-step generator; that mode is not implemented here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.unlearning import ForgetBatch, register_objective


@register_objective("sfd")
def sfd_loss(student, teacher, batch: ForgetBatch, settings) -> torch.Tensor:
    with torch.no_grad():
        target = teacher(batch.x_t, batch.t, batch.anchor)
    return F.mse_loss(student(batch.x_t, batch.t, batch.cond).float(), target.float())
