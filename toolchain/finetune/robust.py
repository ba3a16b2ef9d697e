"""The robust option (AdvUnlearn's inner level, `OPTML-Group/AdvUnlearn`): before every upper step
an attack from `toolchain.attacks` finds prefix tokens per forget example that make the current
student predict what the teacher predicts for the concept; the upper objective is then taken on
those attacked prompts, plus a retain term MSE(S(x_t, c_r), T(x_t, c_r)) (AdvUnlearn's utility
term). Its extra wall time is kept in `Training.robust_cost` (`robust` in the summary)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from toolchain.finetune.data import lower_batch
from toolchain.finetune.state import Training, backward


def _attacked_prompts(tr: Training, x_t, t, ids, target, step: int) -> torch.Tensor:
    """(B, L, D) text embeddings of the forget prompts `ids` (B, L) behind the prefix the
    `robust.attack` attack found against the current student on (x_t, t), aiming at `target`."""
    from toolchain.attacks import prefix_attack, soft_prefix_attack

    cfg, encoder = tr.cfg, tr.prompt_encoder
    seed = cfg.seed * 1_000_003 + step
    args = (tr.unwrapped.unet, encoder, target, x_t, t, ids, cfg.robust.prefix_tokens)
    if cfg.robust.attack == "embedding":
        attacked, _ = soft_prefix_attack(*args, cfg.robust.attack_steps, cfg.robust.attack_lr, seed=seed)
        return attacked
    found = prefix_attack(*args, cfg.robust.attack_steps, candidates=cfg.robust.attack_candidates, seed=seed)
    with torch.no_grad():
        prefix = encoder.table[found.prefix_ids.to(encoder.table.device)]
        return encoder.encode_embeddings(encoder.with_prefix(ids, prefix))


def robust_conditioning(tr: Training, batch, step: int) -> torch.Tensor | None:
    """AdvUnlearn's inner level on a global forget batch: the forget conditioning (B, L, D) with
    the first `robust.attacked_share` of its rows attacked (one prefix each) and the rest plain,
    or None when not robust. Keeping plain rows keeps the plain prompts erased while the attacked
    ones are added. Every process attacks the whole global batch (same seed, same weights: same
    result)."""
    if not tr.robust:
        return None
    cfg, data = tr.cfg, tr.data
    started_at = time.perf_counter()
    x0, noise, t, fpids, _ = batch
    cond = data.emb[fpids].clone()
    rows = torch.arange(len(fpids))[: max(1, round(cfg.robust.attacked_share * len(fpids)))]
    if cfg.robust.attacked_share > 0:
        x_t = tr.noise_scheduler.add_noise(x0[rows], noise[rows], t[rows])
        with torch.no_grad():
            target = tr.teacher(
                x_t.to(tr.device), t[rows].to(tr.device), encoder_hidden_states=cond[rows].to(tr.device)
            ).sample
        attacked = _attacked_prompts(tr, x_t, t[rows], data.ids[fpids[rows]], target, step)
        cond[rows] = attacked.float().cpu()
    tr.robust_cost["attack_s"] += time.perf_counter() - started_at
    tr.robust_cost["attacks"] += 1
    return cond.to(tr.device)


def retain_kd_loss(tr: Training, batch, micro: int) -> torch.Tensor:
    """The robust option's retain term: MSE(S(x_t, c_r), T(x_t, c_r)) on a retain micro-batch."""
    x0, noise, t, pids = (tr.local(v, micro) for v in batch)
    x_t = tr.noise_scheduler.add_noise(x0, noise, t)
    emb = tr.data.emb.to(tr.device)[pids]
    with tr.accelerator.autocast():
        return F.mse_loss(tr.student_out(x_t, t, emb).float(), tr.teacher_out(x_t, t, emb).float())


def robust_retain_term(tr: Training, step: int) -> dict[str, float]:
    """Accumulate `robust.retain_weight`·retain_kd_loss's gradients; {"robust_retain": value}, or
    {} when not robust or the weight is 0."""
    if not (tr.robust and tr.cfg.robust.retain_weight > 0):
        return {}
    started_at = time.perf_counter()
    retain_batch = lower_batch(tr.data, tr.cfg, step, 5, tr.num_timesteps)
    value = backward(tr, lambda m: retain_kd_loss(tr, retain_batch, m), tr.model, scale=tr.cfg.robust.retain_weight)
    tr.robust_cost["retain_s"] += time.perf_counter() - started_at
    return {"robust_retain": value}
