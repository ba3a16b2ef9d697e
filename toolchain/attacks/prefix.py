"""The discrete prefix-prompt attack, in the manner of UnlearnDiffAtk (Zhang et al. 2024,
`OPTML-Group/Diffusion-MU-Attack`).

k prefix tokens are put in front of a concept prompt and optimised so that the erased model's
prediction on noised concept latents matches the original model's prediction for the plain
prompt: min_P MSE(S(x_t, t, E(P + prompt)), T(x_t, t, E(prompt))). The prefix stays discrete:
the gradient with respect to the prefix token embeddings ranks, per position, the vocabulary
tokens by their first-order loss change, and a few of the best single-token swaps are checked
exactly each step (the AutoPrompt / GCG form of "embedding gradients projected to tokens").

Why not PEZ's continuous-then-nearest-token projection: on the digits model (91 usable tokens,
embedding norm ~0.16) the Adam-updated continuous prefix drifted without ever changing its
nearest token, so the attack never moved (measured on a partly erased digits model: 10 steps, the
same token triple throughout). As UnlearnDiffAtk stops on its classifier's verdict, the judge may
look at the current prefixes every few steps (`select`), and the prefix it rated highest is
returned; the reported success is then measured on other seeds.

Choices left open by the paper: the x_t of an attack are one fixed batch per prompt (latents,
noise and timesteps drawn once from `seed`, t uniform over [0, T)), which makes losses of
different steps comparable; the vocabulary is `PromptEncoder.candidates` (whole-word tokens that
round-trip), so the found prefix is plain text an exported model can be measured with too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from toolchain.attacks.encoder import PromptEncoder


def rows_per_prompt(prefix_tokens: int, steps: int, n_prompts: int, n_rows: int) -> int:
    """Check a prefix attack's budget and batch; returns the attack rows per prompt."""
    if prefix_tokens < 1:
        raise ValueError(f"prefix_tokens={prefix_tokens}: the prefix attack needs at least one token")
    if steps < 0:
        raise ValueError(f"steps={steps}: must be >= 0")
    if n_prompts == 0 or n_rows % n_prompts:
        raise ValueError(f"{n_rows} attack latents do not split over {n_prompts} prompts")
    return n_rows // n_prompts


@dataclass
class PrefixAttack:
    """The result of `prefix_attack`: one attacked prompt per input prompt.

    prefix_ids (N, k): the returned prefixes; loss_start / loss_best (N,): the matching loss of the
    random starting prefix and the lowest the search reached; steps: search steps taken (= the
    budget)."""

    prompts: list[str]
    attacked: list[str]
    prefix_ids: torch.Tensor
    loss_start: list[float]
    loss_best: list[float]
    steps: int


def attack_batch(latents: torch.Tensor, n_prompts: int, per_prompt: int, scheduler, seed: int):
    """Fixed noised latents for `n_prompts` prompts, `per_prompt` each: x_t (N·b, C, h, w), t (N·b,).

    latents: (M, C, h, w) concept latents, drawn with replacement."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(latents), (n_prompts * per_prompt,), generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=g)
    noise = torch.randn(latents[rows].shape, generator=g)
    x0 = latents[rows].float().cpu()
    return scheduler.add_noise(x0, noise, t), t, noise


def prefix_attack(
    unet,
    encoder: PromptEncoder,
    target: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prompts: list[str] | torch.Tensor,
    prefix_tokens: int,
    steps: int,
    candidates: int = 8,
    topk: int = 8,
    seed: int = 0,
    select=None,
    select_every: int = 0,
) -> PrefixAttack:
    """Search a `prefix_tokens`-token discrete prefix per prompt in `steps` steps (`_search_step`).

    Cost: 1 + 2·steps UNet passes (the first scores the random starting prefix), the second of
    each step at `candidates`·N·b rows.

    unet: the erased model, `unet(x_t, t, encoder_hidden_states=...)`; its parameters get no
    gradient (torch.autograd.grad on the prefix only), so it may be a model in training.
    target: (N·b, C, h, w) the original model's prediction for the plain prompts on x_t (N·b, ...),
    t (N·b,): b rows per prompt, in prompt order. prompts: N strings, or their token ids (N, L)
    (then `attacked` holds the prefixes only).
    select: optional `select(attacked_prompts) -> (N,) judged concept rates`, called every
    `select_every` steps and at the end on the current prefixes; the returned prefix per prompt is
    the one with the highest judged rate (ties: the later one), as UnlearnDiffAtk stops on the
    classifier's verdict. Without it, the prefix with the lowest loss.
    """
    n = len(prompts)
    per = rows_per_prompt(prefix_tokens, steps, n, len(x_t))
    device = encoder.table.device
    table = encoder.table.detach()
    pool = encoder.candidates.to(device)
    g = torch.Generator().manual_seed(seed)
    current = pool[torch.randint(len(pool), (n, prefix_tokens), generator=g).to(device)]
    ids = (prompts if isinstance(prompts, torch.Tensor) else encoder.ids(prompts)).to(device)
    texts = prompts if not isinstance(prompts, torch.Tensor) else [""] * n
    batch = (x_t.to(device), t.to(device), target.to(device).float(), per)
    losses = partial(_matching_losses, unet, encoder, ids, batch)
    with torch.no_grad():
        loss = losses(current, torch.arange(n, device=device), False)[1]
    first = loss.detach().cpu()
    judged = torch.full((n,), -1.0)
    chosen = current.clone()
    for step in range(steps):
        loss = _search_step(losses, current, loss, table, pool, candidates, topk, g)
        if select is not None and select_every and (step + 1) % select_every == 0 and step + 1 < steps:
            _keep_judged_best(select, encoder, current, texts, judged, chosen)
    if select is not None:
        _keep_judged_best(select, encoder, current, texts, judged, chosen)
    else:
        chosen = current
    return PrefixAttack(
        prompts=list(texts),
        attacked=[f"{p} {q}".strip() for p, q in zip(encoder.decode(chosen), texts, strict=True)],
        prefix_ids=chosen.cpu(),
        loss_start=first.tolist(),
        loss_best=loss.detach().cpu().tolist(),
        steps=steps,
    )


def _matching_losses(unet, encoder: PromptEncoder, ids: torch.Tensor, batch: tuple, prefix_ids, rows, grad: bool):
    """The matching loss (M,) of prefixes prefix_ids (M, k) for prompts `rows` (M,), and the prefix
    token embeddings (M, k, D_tok) it was computed from (with a gradient when `grad`).

    ids (N, L): the prompts' token ids; batch: (x_t, t, target, b) with b rows per prompt."""
    x_t, t, target, per = batch
    embedded = encoder.table.detach()[prefix_ids].clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        cond = encoder.encode_embeddings(encoder.with_prefix(ids[rows], embedded))
        select_rows = (rows.view(-1, 1) * per + torch.arange(per, device=x_t.device)).flatten()
        pred = unet(x_t[select_rows], t[select_rows], encoder_hidden_states=cond.repeat_interleave(per, 0)).sample
        value = F.mse_loss(pred.float(), target[select_rows], reduction="none").mean(dim=(1, 2, 3))
    return embedded, value.view(-1, per).mean(1)


def _search_step(losses, current: torch.Tensor, loss: torch.Tensor, table, pool, candidates: int, topk: int, g):
    """One step of the search; updates `current` (N, k) in place and returns the new loss (N,).

    One forward/backward pass at the current prefixes gives the gradient g_j of the matching loss
    at every prefix position j; the first-order change of swapping in token v is (e_v − e_cur)·g_j,
    so each position's `topk` candidate tokens are those with the lowest e_v·g_j; `candidates`
    single-token swaps per prompt are drawn among them (from generator `g`) and evaluated exactly
    in one batched forward pass; the best is kept when it lowers the loss."""
    n, k = current.shape
    device = current.device
    every = torch.arange(n, device=device)
    embedded, value = losses(current, every, True)
    (grad,) = torch.autograd.grad(value.sum(), embedded)  # (N, k, D_tok)
    scores = grad.float() @ table[pool].float().T  # (N, k, V_c): lower = larger first-order decrease
    top = scores.topk(min(topk, len(pool)), dim=-1, largest=False).indices
    position = torch.randint(k, (n, candidates), generator=g).to(device)
    pick = torch.randint(top.shape[-1], (n, candidates), generator=g).to(device)
    proposals = current.unsqueeze(1).repeat(1, candidates, 1)  # (N, S, k)
    tokens = pool[top[every.view(-1, 1), position, pick]]
    proposals.scatter_(2, position.unsqueeze(-1), tokens.unsqueeze(-1))
    with torch.no_grad():
        tried = losses(proposals.view(-1, k), every.repeat_interleave(candidates), False)[1]
    best_value, best = tried.view(n, candidates).min(dim=1)
    improve = best_value < loss
    current[improve] = proposals[every, best][improve]
    return torch.where(improve, best_value, loss)


def _keep_judged_best(select, encoder: PromptEncoder, current, texts: list[str], judged, chosen) -> None:
    """Judge the current prefixes (N, k) with `select`; where a prompt's rate is at least its best
    so far (ties: the later prefix), copy its prefix into `chosen`. Updates judged (N,) in place."""
    rates = torch.as_tensor(select([f"{p} {q}" for p, q in zip(encoder.decode(current), texts, strict=True)]))
    better = (rates.float() >= judged).to(current.device)
    judged.copy_(torch.maximum(rates.float(), judged))
    chosen[better] = current[better]
