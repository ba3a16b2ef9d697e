"""One lower step (distillation, L_ft) and one upper step (the unlearning objective; EraseDiff's
constrained step) of the distill / sequential / bilevel loops. `train` (loop.py) says which step
runs when; bilevel-penalty's step is in penalty.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolchain.finetune.data import lower_batch, upper_batch
from toolchain.finetune.losses import denoising_loss, feature_kd_loss, forward_with_features, min_snr_weights
from toolchain.finetune.robust import robust_conditioning, robust_retain_term
from toolchain.finetune.state import Training, backward, check, lower_lr
from toolchain.runtime.schedule import diffusion_target
from toolchain.unlearning import ForgetBatch


def distill_loss(tr: Training, net, batch, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
    """L_ft = w_diff·L_diff + w_out·L_outKD + w_feat·L_featKD of `net` (the student or its copy)
    on a micro-batch of a retain batch; returns the loss and its three parts."""
    cfg, scheduler = tr.cfg, tr.noise_scheduler
    x0, noise, t, pids = (tr.local(v, micro) for v in batch)
    emb = tr.data.emb.to(tr.device)[pids]
    x_t = scheduler.add_noise(x0, noise, t)
    target = diffusion_target(scheduler, x0, noise, t)
    with tr.accelerator.autocast():
        with torch.no_grad():
            t_out, t_feats = forward_with_features(tr.teacher, list(tr.kd_widths), x_t, t, emb)
        s_out, s_feats = net(x_t, t, emb)
    l_diff = denoising_loss(s_out, target, min_snr_weights(scheduler, t, cfg.snr_gamma))
    l_out = F.mse_loss(s_out.float(), t_out.float())
    l_feat = feature_kd_loss(s_feats, t_feats, list(tr.kd_widths), tr.device)
    loss = cfg.w_diff * l_diff + cfg.w_out * l_out + cfg.w_feat * l_feat
    return loss, {"diff": l_diff.item(), "out_kd": l_out.item(), "feat_kd": l_feat.item()}


def upper_loss(tr: Training, batch, micro: int, attacked=None) -> torch.Tensor:
    """The objective on a micro-batch of a forget batch; `attacked` (B, L, D): the robust
    option's adversarial forget conditioning of the global batch."""
    x0, noise, t, fpids, apids = (tr.local(v, micro) for v in batch)
    emb = tr.data.emb.to(tr.device)
    forget = ForgetBatch(
        x_t=tr.noise_scheduler.add_noise(x0, noise, t),
        t=t,
        cond=emb[fpids] if attacked is None else tr.local(attacked, micro),
        uncond=emb[torch.zeros_like(fpids)],
        anchor=emb[apids],
        plain=None if attacked is None else emb[fpids],
    )
    with tr.accelerator.autocast():
        return tr.objective(tr.student_out, tr.teacher_out, forget, tr.cfg.objective_settings)


def retain_denoising_loss(tr: Training, batch, micro: int) -> torch.Tensor:
    """EraseDiff's L_r: the ordinary (min-SNR) denoising loss of the student on retain data."""
    scheduler = tr.noise_scheduler
    x0, noise, t, pids = (tr.local(v, micro) for v in batch)
    x_t = scheduler.add_noise(x0, noise, t)
    with tr.accelerator.autocast():
        pred = tr.student_out(x_t, t, tr.data.emb.to(tr.device)[pids])
    return denoising_loss(
        pred, diffusion_target(scheduler, x0, noise, t), min_snr_weights(scheduler, t, tr.cfg.snr_gamma)
    )


def lower_step(tr: Training, step: int, net, optimizer, stream: int) -> dict[str, float]:
    """One L_ft step of `net` by `optimizer` on retain batch `stream` of `step`."""
    cfg = tr.cfg
    optimizer.zero_grad(set_to_none=True)
    batch = lower_batch(tr.data, cfg, step, stream, tr.num_timesteps)
    parts: dict[str, float] = {}

    def loss_of(micro):
        loss, p = distill_loss(tr, net, batch, micro)
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v / cfg.gradient_accumulation_steps
        return loss

    value = backward(tr, loss_of, net)
    check(tr, value, "lower", step)
    for group in optimizer.param_groups:
        group["lr"] = lower_lr(cfg, step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"lower": value, **parts}


def _forget_minimum(tr: Training, step: int) -> float:
    """EraseDiff's L_f* ≈ min L_f: `erasediff.inner_steps` SGD steps of the trainable subset on
    fresh forget batches, then the weights restored; returns the mean loss (for the log)."""
    cfg, subset = tr.cfg, tr.subset
    saved = [p.detach().clone() for p in subset]
    inner = torch.optim.SGD(subset, lr=cfg.upper_lr)
    values = []
    for k in range(cfg.erasediff.inner_steps):
        inner.zero_grad(set_to_none=True)
        b = upper_batch(tr.data, cfg, step, 3 + k, tr.num_timesteps)
        values.append(backward(tr, lambda m, b=b: upper_loss(tr, b, m), tr.model))
        inner.step()
    with torch.no_grad():
        for p, s in zip(subset, saved, strict=True):
            p.copy_(s)
    tr.model.zero_grad(set_to_none=True)
    return sum(values) / len(values)


def _erasediff_gradients(tr: Training, step: int, batch, attacked) -> dict[str, float]:
    """EraseDiff's first-order step direction ∇L_r + λ∇q, ∇q = ∇L_f (L_f* is a constant),
    accumulated as gradients; returns the log record."""
    lam = tr.cfg.erasediff.lambda_bome
    record: dict[str, float] = {}
    retain = lower_batch(tr.data, tr.cfg, step, 2, tr.num_timesteps)
    if tr.cfg.erasediff.inner_steps:
        record["forget_min"] = _forget_minimum(tr, step)
    l_r = backward(tr, lambda m: retain_denoising_loss(tr, retain, m), tr.model)
    l_f = backward(tr, lambda m: upper_loss(tr, batch, m, attacked), tr.model, scale=lam)
    check(tr, l_r + lam * l_f, "upper", step)
    record.update(upper=l_r + lam * l_f, retain=l_r, forget=l_f, erasediff_lambda=lam)
    if "forget_min" in record:
        record["forget_gap"] = l_f - record["forget_min"]
    return record


def upper_step(tr: Training, step: int) -> dict[str, float]:
    """One step of the trainable subset on the objective (robust: on attacked prompts, plus the
    retain term) by the upper optimiser."""
    tr.upper_opt.zero_grad(set_to_none=True)
    tr.lower_opt.zero_grad(set_to_none=True)
    batch = upper_batch(tr.data, tr.cfg, step, 1, tr.num_timesteps)
    attacked = robust_conditioning(tr, batch, step)
    if tr.cfg.objective == "erasediff":
        record = _erasediff_gradients(tr, step, batch, attacked)
    else:
        value = backward(tr, lambda m: upper_loss(tr, batch, m, attacked), tr.model)
        check(tr, value, "upper", step)
        record = {"upper": value}
    record.update(robust_retain_term(tr, step))
    tr.upper_opt.step()
    tr.upper_opt.zero_grad(set_to_none=True)
    tr.lower_opt.zero_grad(set_to_none=True)
    return record
