"""ESD (Gandikota et al., `rohitgandikota/erasing`): negative guidance away from the concept.

    L = MSE(S(x_t, c), sg[T(x_t, ∅) − η·(T(x_t, c) − T(x_t, ∅))]),  η = `esd_eta` (1)

computed with the frozen unpruned teacher, as `rezashkv/unlearn-ft`'s upper step does. x_t are
forward-noised teacher samples of the concept prompts (the finetune stage generates them; the
original ESD samples the model for a random number of steps instead). ESD-x = trainable subset
"cross_attention" (styles), ESD-u = "non_cross_attention" (global concepts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.unlearning import ForgetBatch, register_objective


@register_objective("esd")
def esd_loss(student, teacher, batch: ForgetBatch, settings) -> torch.Tensor:
    with torch.no_grad():
        uncond = teacher(batch.x_t, batch.t, batch.uncond)
        cond = teacher(batch.x_t, batch.t, batch.cond)
        target = uncond - settings.esd_eta * (cond - uncond)
    return F.mse_loss(student(batch.x_t, batch.t, batch.cond).float(), target.float())
