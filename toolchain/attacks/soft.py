"""The soft-prompt attack (AdvUnlearn's `SoftPromptAttack`, the attack its training alternates
with): the same k-token prefix and matching loss as the prefix attack, but the prefix embeddings
are free vectors moved by Adam, with no projection to tokens. A superset of the discrete attack's
reach, measured on PyTorch models only (its prompts are not text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.attacks.encoder import PromptEncoder
from toolchain.attacks.prefix import rows_per_prompt


def soft_prefix_attack(
    unet,
    encoder: PromptEncoder,
    target: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    ids: torch.Tensor,
    prefix_tokens: int,
    steps: int,
    lr: float,
    seed: int = 0,
) -> tuple[torch.Tensor, list[float]]:
    """The continuous prefix attack AdvUnlearn trains against (its `SoftPromptAttack`):
    `prefix_tokens` free token embeddings per prompt, started from random vocabulary tokens and
    moved by `steps` Adam steps (lr `lr`) on the same matching loss as `prefix_attack`,
    MSE(S(x_t, t, E(P + prompt)), target), with no projection to tokens. It is a stronger
    adversary than the discrete search (it reaches every embedding, as concept inversion does) at
    one UNet forward/backward per step, so it is the robust option's default inner attack.

    ids (N, L): token ids of the N prompts; x_t, t, target: b = len(x_t) / N rows per prompt, in
    prompt order. The UNet's parameters get no gradient. Returns the attacked text embeddings
    (N, L, D), detached, and the loss before each step."""
    n = len(ids)
    per = rows_per_prompt(prefix_tokens, steps, n, len(x_t))
    device = encoder.table.device
    ids, x_t, t, target = ids.to(device), x_t.to(device), t.to(device), target.to(device).float()
    g = torch.Generator().manual_seed(seed)
    pool = encoder.candidates
    start = pool[torch.randint(len(pool), (n, prefix_tokens), generator=g)].to(device)
    prefix = encoder.table.detach()[start].float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([prefix], lr=lr)
    history = []

    def attacked() -> torch.Tensor:
        embeddings = encoder.with_prefix(ids, prefix.to(encoder.table.dtype))
        return encoder.encode_embeddings(embeddings)

    for _ in range(steps):
        cond = attacked().repeat_interleave(per, 0)
        pred = unet(x_t, t, encoder_hidden_states=cond.to(x_t.dtype)).sample
        loss = F.mse_loss(pred.float(), target)
        (prefix.grad,) = torch.autograd.grad(loss, prefix)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
    with torch.no_grad():
        return attacked(), history
