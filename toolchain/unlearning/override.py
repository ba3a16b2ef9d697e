"""Override: score matching of the forget prompts to a safe override concept, data-free.

    L = MSE(S(x_t, c_forget), sg[T(x_t, c_override)])

The student's prediction for the forget prompts is pulled to the teacher's for the override
concept (`ConceptConfig.anchor_prompt`, e.g. "brad pitt" → "a middle aged man") on noised teacher
samples of the forget prompts.

Formerly registered as `sfd`, a name it does not earn: Score Forgetting Distillation (Chen et al.,
ICLR 2025, `tqch/score-forgetting-distillation`) forgets inside score-identity distillation to a
generator. Its forget term compares the teacher's override score with a *fake score* trained on the
generator's own samples of c_forget, and the gradient reaches the generator through those samples;
neither exists for a diffusion student trained on fixed teacher samples. That term is implemented
where it can be, `finetune.mode=sfd` (toolchain/finetune/sfd.py); this upper loss keeps only SFD's target
(the override concept's teacher score), so it is named after it. `finetune.objective=sfd` is refused
with a message naming both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.unlearning import ForgetBatch, register_objective


@register_objective("override")
def override_loss(student, teacher, batch: ForgetBatch, settings) -> torch.Tensor:
    with torch.no_grad():
        target = teacher(batch.x_t, batch.t, batch.anchor)
    return F.mse_loss(student(batch.x_t, batch.t, batch.cond).float(), target.float())
