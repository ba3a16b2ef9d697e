"""White-box attacks on concept erasure: a discrete prefix-prompt attack, its continuous
(soft-prompt) form and concept inversion.

All need gradients, so they run on PyTorch models (a diffusers pipeline's `text_encoder`,
`tokenizer` and `unet`); the prompts the prefix attack finds are plain strings, so an exported
model can be measured with them too (transfer).

- Prefix attack, in the manner of UnlearnDiffAtk (Zhang et al. 2024, `OPTML-Group/Diffusion-MU-Attack`):
  k prefix tokens are put in front of a concept prompt and optimised so that the erased model's
  prediction on noised concept latents matches the original model's prediction for the plain
  prompt: min_P MSE(S(x_t, t, E(P + prompt)), T(x_t, t, E(prompt))). The prefix stays discrete:
  the gradient with respect to the prefix token embeddings ranks, per position, the vocabulary
  tokens by their first-order loss change, and a few of the best single-token swaps are checked
  exactly each step (the AutoPrompt / GCG form of "embedding gradients projected to tokens").
  Why not PEZ's continuous-then-nearest-token projection: on the digits model (91 usable tokens,
  embedding norm ~0.16) the Adam-updated continuous prefix drifted without ever changing its
  nearest token, so the attack never moved (measured on a partly erased digits model: 10
  steps, the same token triple throughout). As UnlearnDiffAtk stops on its classifier's verdict, the
  judge may look at the current prefixes every few steps (`select`), and the prefix it rated
  highest is returned; the reported success is then measured on other seeds. Choices left open
  by the paper: the x_t of an attack are one fixed batch per prompt (latents, noise and
  timesteps drawn once from `seed`, t uniform over [0, T)), which makes losses of different
  steps comparable; the vocabulary is every whole-word token ("...</w>") that round-trips
  through the tokenizer, so the found prefix decodes to a string that encodes back to the same
  tokens. The concept latents are the original model's own DDIM samples of the concept prompts.
- Soft-prompt attack (AdvUnlearn's `SoftPromptAttack`, the attack its training alternates with):
  the same k-token prefix and matching loss as the prefix attack, but the prefix embeddings are
  free vectors moved by Adam, with no projection to tokens. A superset of the discrete attack's
  reach, measured on PyTorch models only (its prompts are not text).
- Concept inversion (textual inversion, Gal et al. 2022, used as an attack on erasure by Pham et
  al. 2024): one new token embedding v is learned with the denoising loss of the *erased* model
  on concept latents, min_v MSE(S(x_t, t, E("<v>")), eps); the erased model then generates from
  E("<v>") alone. v exists only as an embedding, so it is measured on PyTorch models only.

Attack success rate = share of generations from attacked prompts (or from the inverted
embedding) that the judge labels as the erased concept. With `images_per_prompt` images per
attacked prompt this is the share over all (prompt, image) pairs; the unattacked prompts under
the same seeds give `plain`, the leakage the attack starts from.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class PromptEncoder:
    """Token-level access to a CLIP text encoder: prompts -> token ids -> token embeddings ->
    text embeddings, with k prefix token embeddings inserted after the start token.

    L = sequence length (tokenizer max length, capped by the encoder's positions), D_tok = token
    embedding width, D = text embedding width (equal for CLIP).
    """

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        positions = getattr(text_encoder.config, "max_position_embeddings", tokenizer.model_max_length)
        self.length = min(int(tokenizer.model_max_length), int(positions))
        self.candidates = self._word_tokens()

    @property
    def table(self) -> torch.Tensor:
        """(V, D_tok) the frozen token embedding table."""
        return self.text_encoder.get_input_embeddings().weight

    def _word_tokens(self) -> torch.Tensor:
        """Ids of whole-word tokens whose decoded text encodes back to exactly that token."""
        special = {self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        keep = []
        for token, index in self.tokenizer.get_vocab().items():
            if index in special or not token.endswith("</w>"):
                continue
            text = self.tokenizer.decode([index]).strip()
            if text and self.tokenizer(text, add_special_tokens=False).input_ids == [index]:
                keep.append(index)
        if not keep:
            raise ValueError("the tokenizer has no whole-word token that round-trips; the prefix attack needs some")
        return torch.tensor(sorted(keep), dtype=torch.long)

    def ids(self, prompts: list[str]) -> torch.Tensor:
        """(N, L) token ids, padded to L."""
        return self.tokenizer(
            prompts, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        ).input_ids

    def with_prefix(self, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """(N, L, D_tok) token embeddings of [BOS, prefix (N, k, D_tok), prompt tokens...], cut to
        L tokens; the prompt's own end token is kept (its last words give way first)."""
        device = self.table.device
        ids = ids.to(device)
        k = prefix.shape[1]
        words = self.table[ids]  # (N, L, D_tok)
        eos = self.tokenizer.eos_token_id
        rows = []
        end = self.table[eos].view(1, -1)
        for i in range(len(ids)):
            ends = (ids[i] == eos).nonzero()
            n = int(ends[0]) if len(ends) else ids.shape[1]  # first end token
            body = words[i, 1:n][: max(0, self.length - 2 - k)]  # prompt words without BOS
            tail = words[i, n:][: self.length - 1 - k - len(body)]  # EOS and padding
            if len(tail) == 0:
                tail = end
            row = torch.cat([words[i, :1], prefix[i].to(words.dtype), body, tail])
            rows.append(torch.cat([row, end.expand(self.length - len(row), -1)]))
        return torch.stack(rows)

    def encode_embeddings(self, token_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, L, D_tok) -> (N, L, D) last hidden state, as `text_encoder(ids)[0]` computes it."""
        from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

        model = self.text_encoder.text_model
        hidden = model.embeddings(inputs_embeds=token_embeddings)
        mask = _create_4d_causal_attention_mask(token_embeddings.shape[:2], hidden.dtype, device=hidden.device)
        out = model.encoder(inputs_embeds=hidden, causal_attention_mask=mask).last_hidden_state
        return model.final_layer_norm(out)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, D) text embeddings of plain prompts (no gradient)."""
        with torch.no_grad():
            return self.text_encoder(self.ids(prompts).to(self.table.device))[0]

    def decode(self, prefix_ids: torch.Tensor) -> list[str]:
        """(N, k) -> the prefixes as text."""
        return [" ".join(self.tokenizer.decode([int(i)]).strip() for i in row) for row in prefix_ids]


def _rows_per_prompt(prefix_tokens: int, steps: int, n_prompts: int, n_rows: int) -> int:
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
    """Search a `prefix_tokens`-token discrete prefix per prompt in `steps` steps.

    Each step: one forward/backward pass at the current prefixes gives the gradient g_j of the
    matching loss at every prefix position j; the first-order change of swapping in token v is
    (e_v − e_cur)·g_j, so each position's `topk` candidate tokens are those with the lowest e_v·g_j;
    `candidates` single-token swaps per prompt are drawn among them (seeded) and evaluated exactly
    in one batched forward pass; the best is kept when it lowers the loss. Cost: 1 + 2·steps UNet
    passes (the first scores the random starting prefix), the second of each step at
    `candidates`·N·b rows.

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
    per = _rows_per_prompt(prefix_tokens, steps, n, len(x_t))
    device = encoder.table.device
    table = encoder.table.detach()
    pool = encoder.candidates.to(device)
    g = torch.Generator().manual_seed(seed)
    current = pool[torch.randint(len(pool), (n, prefix_tokens), generator=g).to(device)]
    ids = (prompts if isinstance(prompts, torch.Tensor) else encoder.ids(prompts)).to(device)
    x_t, t, target = x_t.to(device), t.to(device), target.to(device).float()
    texts = prompts if not isinstance(prompts, torch.Tensor) else [""] * n

    def losses(prefix_ids: torch.Tensor, rows: torch.Tensor, grad: bool):
        """Per-prefix loss (M,) of prefixes (M, k) for prompts `rows` (M,) and the embeddings."""
        embedded = table[prefix_ids].clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            cond = encoder.encode_embeddings(encoder.with_prefix(ids[rows], embedded))
            select_rows = (rows.view(-1, 1) * per + torch.arange(per, device=device)).flatten()
            pred = unet(x_t[select_rows], t[select_rows], encoder_hidden_states=cond.repeat_interleave(per, 0)).sample
            value = F.mse_loss(pred.float(), target[select_rows], reduction="none").mean(dim=(1, 2, 3))
        return embedded, value.view(-1, per).mean(1)

    every = torch.arange(n, device=device)
    with torch.no_grad():
        loss = losses(current, every, False)[1]
    first = loss.detach().cpu()
    judged = torch.full((n,), -1.0)
    chosen = current.clone()

    def judge_now() -> None:
        rates = torch.as_tensor(select([f"{p} {q}" for p, q in zip(encoder.decode(current), texts, strict=True)]))
        better = (rates.float() >= judged).to(device)
        judged.copy_(torch.maximum(rates.float(), judged))
        chosen[better] = current[better]

    for step in range(steps):
        embedded, value = losses(current, every, True)
        (grad,) = torch.autograd.grad(value.sum(), embedded)  # (N, k, D_tok)
        scores = grad.float() @ table[pool].float().T  # (N, k, V_c): lower = larger first-order decrease
        top = scores.topk(min(topk, len(pool)), dim=-1, largest=False).indices
        position = torch.randint(prefix_tokens, (n, candidates), generator=g).to(device)
        pick = torch.randint(top.shape[-1], (n, candidates), generator=g).to(device)
        proposals = current.unsqueeze(1).repeat(1, candidates, 1)  # (N, S, k)
        tokens = pool[top[every.view(-1, 1), position, pick]]
        proposals.scatter_(2, position.unsqueeze(-1), tokens.unsqueeze(-1))
        with torch.no_grad():
            tried = losses(proposals.view(-1, prefix_tokens), every.repeat_interleave(candidates), False)[1]
        tried = tried.view(n, candidates)
        best_value, best = tried.min(dim=1)
        improve = best_value < loss
        current[improve] = proposals[every, best][improve]
        loss = torch.where(improve, best_value, loss)
        if select is not None and select_every and (step + 1) % select_every == 0 and step + 1 < steps:
            judge_now()
    if select is not None:
        judge_now()
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
    per = _rows_per_prompt(prefix_tokens, steps, n, len(x_t))
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


def concept_inversion(
    unet, encoder: PromptEncoder, latents: torch.Tensor, scheduler, steps: int, lr: float, batch: int, seed: int = 0
) -> tuple[torch.Tensor, list[float]]:
    """Learn one token embedding v (D_tok,) so the erased `unet` denoises concept `latents` given
    E("<v>") (the prompt is the new token alone); `steps` Adam steps on the epsilon/v loss.
    Returns v and the loss of every step."""
    from toolchain.runtime.schedule import diffusion_target

    if steps < 0:
        raise ValueError(f"inversion steps={steps}: must be >= 0")
    device = encoder.table.device
    table = encoder.table.detach()
    ids = encoder.ids([""])  # [BOS, EOS, pad...]: v goes where a one-word prompt would
    vector = table[encoder.candidates.to(device)].float().mean(0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(steps):
        rows = torch.randint(len(latents), (batch,), generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        x0 = latents[rows].float().cpu()
        noise = torch.randn(x0.shape, generator=g)
        x_t = scheduler.add_noise(x0, noise, t).to(device)
        target = diffusion_target(scheduler, x0, noise, t).to(device)
        cond = encoder.encode_embeddings(encoder.with_prefix(ids, vector.view(1, 1, -1))).expand(batch, -1, -1)
        pred = unet(x_t, t.to(device), encoder_hidden_states=cond.to(x_t.dtype)).sample.float()
        loss = F.mse_loss(pred, target.float())
        (grad,) = torch.autograd.grad(loss, vector)
        vector.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
    return vector.detach(), history


def generate_from_embeddings(pipe, cond: torch.Tensor, seed: int, steps: int, guidance_scale: float) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] from text embeddings cond (N, L, D), "" as the negative, with
    initial latents drawn as `toolchain.runtime.pytorch.diffusers_generator` draws them."""
    pipe.set_progress_bar_config(disable=True)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size
    shape = (len(cond), pipe.unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    encoder = PromptEncoder(pipe.text_encoder, pipe.tokenizer)
    uncond = encoder.encode([""] * len(cond))
    with torch.inference_mode():
        images = pipe(
            prompt_embeds=cond.to(pipe.device, pipe.unet.dtype),
            negative_prompt_embeds=uncond.to(pipe.device, pipe.unet.dtype),
            latents=latents.to(pipe.device, pipe.unet.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=size * vae_scale,
            width=size * vae_scale,
            output_type="np",
        ).images
    return np.asarray(images, dtype=np.float32)


def concept_latents(pipe, prompts: list[str], per_prompt: int, steps: int, guidance_scale: float, seed: int):
    """(len(prompts)·per_prompt, C, h, w) DDIM samples of `pipe` (the original model) for the
    concept prompts, in its latent space: the attacks' "concept images"."""
    from diffusers import DDIMScheduler

    pipe.set_progress_bar_config(disable=True)
    every = [p for p in prompts for _ in range(per_prompt)]
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size
    shape = (len(every), pipe.unet.config.in_channels, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        with torch.no_grad():
            out = pipe(
                prompt=every,
                latents=noise.to(pipe.device, pipe.unet.dtype),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=size * vae_scale,
                width=size * vae_scale,
                output_type="latent",
            ).images
    finally:
        pipe.scheduler = scheduler
    return out.float().cpu()


@dataclass
class AttackReport:
    """Per erased concept: attack success rates and what produced them (report.json `attack`)."""

    prompt_attack: float  # share of attacked-prompt generations judged as the concept
    embedding_attack: float | None  # same for the inverted embedding (None: inversion off)
    soft_attack: float | None  # same for the soft-prompt attack's embeddings (None: off)
    plain: float  # the same prompts and seeds without the prefix
    attacked_prompts: list[str]
    prefix_loss_start: float
    prefix_loss_best: float
    prefix_tokens: int
    steps: int
    inversion_steps: int
    soft_steps: int
    wall_s: float
    extra: dict = field(default_factory=dict)

    def to_report(self) -> dict:
        return {
            "prompt_attack": self.prompt_attack,
            "embedding_attack": self.embedding_attack,
            "soft_prompt_attack": self.soft_attack,
            "plain": self.plain,
            "prompts": list(self.attacked_prompts),
            "prefix_loss": [round(self.prefix_loss_start, 6), round(self.prefix_loss_best, 6)],
            "budget": {
                "prefix_tokens": self.prefix_tokens,
                "steps": self.steps,
                "inversion_steps": self.inversion_steps,
                "soft_steps": self.soft_steps,
            },
            "wall_s": round(self.wall_s, 2),
            **self.extra,
        }


def attack_concept(
    erased_pipe,
    original_pipe,
    latents: torch.Tensor,
    prompts: list[str],
    label: str,
    judge,
    cfg,
    steps: int = 25,
    guidance_scale: float = 5.0,
) -> AttackReport:
    """Run the attacks of `cfg` (an `AttackConfig`) against `erased_pipe` for one concept.

    original_pipe: the model before erasure; its UNet on its own text embedding of the plain prompt
    is the prefix and soft-prompt attacks' target. latents: concept latents (M, C, h, w)
    from `concept_latents`. prompts: the concept's prompts; the first `cfg.n_prompts` (cycled)
    are attacked. Generation: `steps` DDIM steps at `guidance_scale`, seeds from `cfg.seed`.
    """
    from diffusers import DDPMScheduler

    from toolchain.runtime.pytorch import diffusers_generator

    start = time.perf_counter()
    chosen = [prompts[i % len(prompts)] for i in range(cfg.n_prompts)]
    unet = erased_pipe.unet
    device = unet.device
    encoder = PromptEncoder(erased_pipe.text_encoder, erased_pipe.tokenizer)
    noise_scheduler = DDPMScheduler.from_config(erased_pipe.scheduler.config)
    x_t, t, _ = attack_batch(latents, len(chosen), cfg.batch, noise_scheduler, cfg.seed)
    original = PromptEncoder(original_pipe.text_encoder, original_pipe.tokenizer)
    with torch.no_grad():
        cond = original.encode(chosen).repeat_interleave(cfg.batch, 0)
        target = original_pipe.unet(x_t.to(device), t.to(device), encoder_hidden_states=cond.to(device)).sample
    generate = diffusers_generator(erased_pipe, steps=steps, guidance_scale=guidance_scale)

    def select(attacked: list[str]) -> np.ndarray:
        images = generate([p for p in attacked for _ in range(cfg.select_images)], cfg.seed + 3)
        labels = judge.classify(images).labels.reshape(len(attacked), cfg.select_images)
        return (labels == str(label)).mean(axis=1)

    found = prefix_attack(
        unet,
        encoder,
        target,
        x_t,
        t,
        chosen,
        cfg.prefix_tokens,
        cfg.steps,
        cfg.candidates,
        cfg.topk,
        cfg.seed,
        select=select,
        select_every=cfg.select_every,
    )
    n = cfg.images_per_prompt
    attacked_images = generate([p for p in found.attacked for _ in range(n)], cfg.seed + 1)
    plain_images = generate([p for p in chosen for _ in range(n)], cfg.seed + 1)
    prompt_rate = float((judge.classify(attacked_images).labels == str(label)).mean())
    plain_rate = float((judge.classify(plain_images).labels == str(label)).mean())

    soft_rate = None
    if cfg.soft_steps > 0:
        cond, _ = soft_prefix_attack(
            unet, encoder, target, x_t, t, encoder.ids(chosen), cfg.prefix_tokens, cfg.soft_steps, cfg.soft_lr, cfg.seed
        )
        images = generate_from_embeddings(
            erased_pipe, cond.repeat_interleave(n, 0), cfg.seed + 1, steps, guidance_scale
        )
        soft_rate = float((judge.classify(images).labels == str(label)).mean())

    embedding_rate = None
    if cfg.inversion_steps > 0:
        vector, _ = concept_inversion(
            unet, encoder, latents, noise_scheduler, cfg.inversion_steps, cfg.inversion_lr, cfg.batch, cfg.seed
        )
        with torch.no_grad():
            token_embeddings = encoder.with_prefix(encoder.ids([""]), vector.view(1, 1, -1))
            cond = encoder.encode_embeddings(token_embeddings).expand(len(chosen) * n, -1, -1)
        images = generate_from_embeddings(erased_pipe, cond, cfg.seed + 2, steps, guidance_scale)
        embedding_rate = float((judge.classify(images).labels == str(label)).mean())
    report = AttackReport(
        prompt_attack=prompt_rate,
        embedding_attack=embedding_rate,
        soft_attack=soft_rate,
        plain=plain_rate,
        attacked_prompts=found.attacked,
        prefix_loss_start=float(np.mean(found.loss_start)),
        prefix_loss_best=float(np.mean(found.loss_best)),
        prefix_tokens=cfg.prefix_tokens,
        steps=cfg.steps,
        inversion_steps=cfg.inversion_steps,
        soft_steps=cfg.soft_steps,
        wall_s=time.perf_counter() - start,
    )
    logger.info(
        "attack %s: prompt %.3f (plain %.3f), soft %s, embedding %s, %.1f s",
        label,
        prompt_rate,
        plain_rate,
        soft_rate,
        embedding_rate,
        report.wall_s,
    )
    return report


def transfer_rate(generate, attacked_prompts: list[str], label: str, judge, images_per_prompt: int, seed: int) -> float:
    """Attack success of prompts found on a PyTorch model, on any generator (e.g. the exported
    model in ONNX Runtime): `generate(prompts, seed) -> (N, H, W[, C])`."""
    images = generate([p for p in attacked_prompts for _ in range(images_per_prompt)], seed + 1)
    return float((judge.classify(images).labels == str(label)).mean())
