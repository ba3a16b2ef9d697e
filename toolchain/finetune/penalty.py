"""bilevel-penalty: the paper's penalty form made to work as BOME (Liu et al. 2022, "BOME! Bilevel
Optimization Made Easy", `Cranial-XIX/BOME`) on split variables: upper θ_u = the `trainable`
subset, lower ϑ = the rest of the UNet and the feature projections (the package docstring has
the whole derivation)."""

from __future__ import annotations

import torch

from toolchain.finetune.data import lower_batch, upper_batch
from toolchain.finetune.robust import robust_conditioning
from toolchain.finetune.state import Training, backward, check, lower_lr
from toolchain.finetune.steps import distill_loss, lower_step, upper_loss


def bome_direction(
    grad_f: list[torch.Tensor], grad_q: list[torch.Tensor], eta: float
) -> tuple[list[torch.Tensor], float]:
    """BOME's update direction d = ∇f + λ∇q with λ = max((φ − <∇f, ∇q>)/|∇q|², 0), φ = η|∇q|²: the
    smallest λ >= 0 with <d, ∇q> >= η|∇q|², so every step closes the gap q at least as fast as η∇q
    alone would, and λ = 0 where ∇f already does. Gradients: one tensor per parameter, in the same
    order; returns (d, λ); λ = 0 where ∇q = 0."""
    dot = sum((f.double() * q.double()).sum() for f, q in zip(grad_f, grad_q, strict=True))
    norm = sum((q.double() ** 2).sum() for q in grad_q)
    if not norm > 0:
        return list(grad_f), 0.0
    lam = max(eta - float(dot / norm), 0.0)
    return [f + lam * q for f, q in zip(grad_f, grad_q, strict=True)], lam


def take_grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The accumulated gradients of `tensors` (zeros where none), which are left without one."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tensors]
    for p in tensors:
        p.grad = None
    return grads


def _inner_solution(tr: Training, step: int, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    """ϑ_K: the copy set to the model, then `penalty.inner_steps` L_ft steps of its lower variables (θ_u
    stay equal to the model's: the inner optimiser skips them). Returns the copy's parameters."""
    plain_copy = list(tr.accelerator.unwrap_model(tr.copy_model).parameters())
    with torch.no_grad():
        for c, p in zip(plain_copy, params, strict=True):
            c.copy_(p)
    record: dict[str, float] = {}
    for k in range(tr.cfg.penalty.inner_steps):
        record["inner"] = lower_step(tr, step, tr.copy_model, tr.lower_opt, 4 + k)["lower"]
    return plain_copy, record


def penalty_step(tr: Training, step: int) -> dict[str, float]:
    """BOME's step: ϑ_K on the copy; ∇L_CU; ∇q = ∇L_ft(θ_u, ϑ) − ∇θ_u L_ft(θ_u, ϑ_K) on one retain
    batch; every parameter moves along d = ∇L_CU + λ∇q (upper group at upper_lr, lower at lower_lr).
    The robust option attacks the forget batch; it has no retain term here (L_ft is one)."""
    params = list(tr.unwrapped.parameters())
    upper_ids = {id(p) for p in tr.subset}
    plain_copy, record = _inner_solution(tr, step, params)
    tr.upper_opt.zero_grad(set_to_none=True)
    batch = upper_batch(tr.data, tr.cfg, step, 1, tr.num_timesteps)
    attacked = robust_conditioning(tr, batch, step)
    record["upper"] = backward(tr, lambda m: upper_loss(tr, batch, m, attacked), tr.model)
    check(tr, record["upper"], "upper", step)
    grad_f = take_grads(params)
    retain = lower_batch(tr.data, tr.cfg, step, 0, tr.num_timesteps)
    record["lower"] = backward(tr, lambda m: distill_loss(tr, tr.model, retain, m)[0], tr.model)
    check(tr, record["lower"], "lower", step)
    grad_q = take_grads(params)  # ∇L_ft(θ_u, ϑ); minus ∇θ_u L_ft(θ_u, ϑ_K) below
    take_grads(plain_copy)  # the inner steps left gradients on the copy's θ_u
    record["lower_inner"] = backward(tr, lambda m: distill_loss(tr, tr.copy_model, retain, m)[0], tr.copy_model)
    for i, (c, p) in enumerate(zip(take_grads(plain_copy), params, strict=True)):
        if id(p) in upper_ids:
            grad_q[i] = grad_q[i] - c
    direction, lam = bome_direction(grad_f, grad_q, tr.cfg.penalty.eta)
    for p, d in zip(params, direction, strict=True):
        p.grad = d
    tr.upper_opt.param_groups[1]["lr"] = lower_lr(tr.cfg, step)
    tr.upper_opt.step()
    tr.upper_opt.zero_grad(set_to_none=True)
    record.update(gap=record["lower"] - record["lower_inner"], penalty_lambda=lam)
    return record
