"""EraseDiff (Wu et al., CVPR 2025, `JingWu321/EraseDiff`): the forget term of a constrained step.

Forget loss ("EraseDiff_rl" variant, the one the SD scripts ship):

    L_f = MSE(S(x_t, c_f), sg[S(x_t, c_pseudo)]),  c_pseudo = `ConceptConfig.anchor_prompt`

The constrained problem `min L_r  s.t.  L_f − min L_f ≤ 0` is solved by the finetune stage's
upper step (`toolchain.stages.finetune`), first order: the step direction is ∇L_r + λ·∇q with
q = L_f − L_f*, L_r = the ordinary denoising loss on the retain batch and λ = `finetune.erasediff.lambda_bome`,
fixed, 0.1 by default as the authors' `lambda_bome` (sd/train_scripts/erasediff.py). The cosine-based
"adaptive" λ (max(η − cos(∇L_r, ∇q), 0)) this project used to offer is not in the paper and not in
the authors' SD scripts (only in their CIFAR-10 DDPM runner, for a negative `lambda_bome`, noted
there as departing from BOME), so it was removed (BOME's own adaptive multiplier, which EraseDiff's
algorithm cites, is what `finetune.mode=bilevel-penalty` uses for the distillation constraint). L_f* (a K-step
estimate of min L_f on a copy, `finetune.erasediff.inner_steps`; the authors average the forget loss over
their K steps) is a constant, so it changes q's value but never the step; it is only estimated
when `finetune.erasediff.inner_steps` > 0, for the log.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.unlearning import ForgetBatch, register_objective


@register_objective("erasediff")
def erasediff_forget_loss(student, teacher, batch: ForgetBatch, settings) -> torch.Tensor:
    with torch.no_grad():
        target = student(batch.x_t, batch.t, batch.anchor)
    return F.mse_loss(student(batch.x_t, batch.t, batch.cond).float(), target.float())
