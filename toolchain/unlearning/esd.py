"""ESD (Gandikota et al., `rohitgandikota/erasing`): negative guidance away from the concept.

    L = MSE(S(x_t, c), sg[T(x_t, ∅) − η·(T(x_t, c) − T(x_t, ∅))]),  η = `finetune.esd.eta` (1)

With `finetune.esd.from_anchor` the base is the anchor prompt a instead of ∅:
target = T(x_t, a) − η·(T(x_t, c) − T(x_t, a)), guidance away from what the concept adds to its
anchor ("a handwritten digit" → "seven"), landing among the anchor's images rather than the
unconditional ones (the `--erase_from` form of the original code, with a's own difference).

Targets are computed with the frozen unpruned teacher, as `rezashkv/unlearn-ft`'s upper step
does. x_t are forward-noised teacher samples of the concept prompts (the finetune stage generates
them; the original ESD samples the model for a random number of steps instead). ESD-x =
trainable subset "cross_attention" (styles), ESD-u = "non_cross_attention" (global concepts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.unlearning import ForgetBatch, register_objective


@register_objective("esd")
def esd_loss(student, teacher, batch: ForgetBatch, settings) -> torch.Tensor:
    with torch.no_grad():
        base = teacher(batch.x_t, batch.t, batch.anchor if settings.from_anchor else batch.uncond)
        cond = teacher(batch.x_t, batch.t, batch.teacher_cond)
        target = base - settings.eta * (cond - base)
    return F.mse_loss(student(batch.x_t, batch.t, batch.cond).float(), target.float())
