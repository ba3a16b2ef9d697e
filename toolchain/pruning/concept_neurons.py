"""ConceptPrune (Chavhan et al., ICLR 2025): erase a concept by zeroing its "skilled" FFN weights.

Training-free and unstructured: it erases, it does not speed anything up. For the second linear
layer of every transformer feed-forward (`ff.net.2`, input = the GEGLU output) and for each of
the first `timesteps` steps of a DDIM sampling run, the WANDA score of every weight is
|W[o, i]| * ||A[:, i]||_2, where A stacks the input activations of all tokens of all prompts
(each token row L2-normalised first, as in the reference code). It is computed once with the
target prompts (e.g. "a handwritten digit seven") and once with paired base prompts
(e.g. "a handwritten digit"). Per output row o, the top `skill_ratio` share of the target scores
whose target score beats the base score are the skilled weights of that step; the union over
the steps is zeroed (`weight *= 1 - mask`, select_ratio 0 in the reference). Run it on the model
that ships: after channel pruning the FFN widths change.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def ffn_output_layers(unet: nn.Module) -> dict[str, nn.Linear]:
    """The second linear layer of every transformer feed-forward, by module name (sorted)."""
    layers = {n: m for n, m in unet.named_modules() if n.endswith("ff.net.2") and isinstance(m, nn.Linear)}
    return dict(sorted(layers.items()))


@torch.no_grad()
def _column_norms(
    pipe,
    layers: dict[str, nn.Linear],
    prompts: list[str],
    timesteps: int,
    steps: int,
    seed: int,
    guidance_scale: float,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Squared column norms of the row-normalised inputs of `layers`, per early step.

    Returns {layer: (timesteps, in_features)}; every prompt starts from the same seeded latent.
    """
    squares = {name: torch.zeros(timesteps, layer.in_features) for name, layer in layers.items()}
    state = {"step": 0}

    def make_hook(name):
        def hook(module, inputs):
            if state["step"] < timesteps:
                rows = inputs[0].detach().reshape(-1, module.in_features).float()
                rows = torch.nn.functional.normalize(rows, p=2, dim=1)
                squares[name][state["step"]] += rows.pow(2).sum(0).cpu()

        return hook

    def on_step_end(pipeline, step, timestep, callback_kwargs):
        state["step"] = step + 1
        if state["step"] >= timesteps:
            pipeline._interrupt = True  # the remaining steps are skipped: nothing is recorded there
        return callback_kwargs

    unet = pipe.unet
    param = next(unet.parameters())
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    latent = torch.randn(1, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in layers.items()]
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            state["step"] = 0
            pipe(
                prompt=batch,
                latents=latent.expand(len(batch), -1, -1, -1).to(param),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=size * vae_scale,
                width=size * vae_scale,
                output_type="latent",
                callback_on_step_end=on_step_end,
            )
    finally:
        for handle in handles:
            handle.remove()
    return squares


def skilled_weights(
    weight: torch.Tensor, target_norm: torch.Tensor, base_norm: torch.Tensor, skill_ratio: float
) -> torch.Tensor:
    """Boolean mask (out, in) of one step: per row, the top `skill_ratio` of the target WANDA
    scores |W| * ||A_target|| that also beat the base score |W| * ||A_base||.

    weight: (out, in); target_norm, base_norm: (in,) column norms. At least one weight per row is
    a candidate (the reference floors skill_ratio * in, which is 0 for layers under 1/skill_ratio
    inputs).
    """
    magnitude = weight.detach().abs().float().cpu()
    target = magnitude * target_norm
    base = magnitude * base_norm
    k = max(1, int(skill_ratio * weight.shape[1]))
    top = torch.zeros_like(target, dtype=torch.bool)
    top.scatter_(1, target.topk(k, dim=1).indices, True)
    return top & (target > base)


def concept_prune(
    pipe,
    target_prompts: list[str],
    base_prompts: list[str],
    skill_ratio: float = 0.01,
    timesteps: int = 10,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
) -> dict:
    """Zero the weights of every `ff.net.2` that are skilled for the target prompts; in place.

    base_prompts: one per target prompt (paired), or a single prompt used for all of them.
    Sampling uses DDIM (the pipeline's scheduler is swapped for the run and restored) for
    `steps` steps; the first `timesteps` are scored, the rest are skipped. Returns a JSON-safe
    record: settings, per-layer {"shape", "zeroed"}, totals, and "masks": {layer: flat indices
    into weight.flatten()} of the zeroed weights.
    """
    if not target_prompts:
        raise ValueError("concept_prune: target_prompts is empty; pass the prompts that name the concept")
    if len(base_prompts) == 1:
        base_prompts = list(base_prompts) * len(target_prompts)
    if len(base_prompts) != len(target_prompts):
        raise ValueError(
            f"concept_prune: {len(target_prompts)} target prompts but {len(base_prompts)} base prompts; "
            "pass one base prompt per target prompt, or a single one"
        )
    if not 0.0 < skill_ratio < 1.0:
        raise ValueError(f"skill_ratio={skill_ratio}: must be in (0, 1), e.g. 0.01")
    if not 1 <= timesteps <= steps:
        raise ValueError(f"timesteps={timesteps}, steps={steps}: need 1 <= timesteps <= steps")
    from diffusers import DDIMScheduler

    layers = ffn_output_layers(pipe.unet)
    if not layers:
        raise ValueError("concept_prune: the UNet has no transformer feed-forward (ff.net.2) layers")
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    try:
        settings = (timesteps, steps, seed, guidance_scale, batch_size)
        target_sq = _column_norms(pipe, layers, list(target_prompts), *settings)
        base_sq = _column_norms(pipe, layers, list(base_prompts), *settings)
    finally:
        pipe.scheduler = scheduler

    record_layers, masks, zeroed_total, ffn_total = {}, {}, 0, 0
    with torch.no_grad():
        for name, layer in layers.items():
            mask = torch.zeros(layer.weight.shape, dtype=torch.bool)
            for t in range(timesteps):
                mask |= skilled_weights(layer.weight, target_sq[name][t].sqrt(), base_sq[name][t].sqrt(), skill_ratio)
            layer.weight[mask.to(layer.weight.device)] = 0
            indices = mask.flatten().nonzero().flatten()
            masks[name] = indices.tolist()
            record_layers[name] = {"shape": list(layer.weight.shape), "zeroed": len(indices)}
            zeroed_total += len(indices)
            ffn_total += layer.weight.numel()
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    logger.info(
        "concept_prune: zeroed %d of %d ff.net.2 weights (%.3f%% of the UNet)",
        zeroed_total,
        ffn_total,
        100 * zeroed_total / unet_params,
    )
    return {
        "method": "concept-prune",
        "skill_ratio": skill_ratio,
        "timesteps": timesteps,
        "steps": steps,
        "seed": seed,
        "guidance_scale": guidance_scale,
        "target_prompts": list(target_prompts),
        "base_prompts": list(base_prompts),
        "layers": record_layers,
        "zeroed_total": zeroed_total,
        "ffn_weights_total": ffn_total,
        "unet_params": unet_params,
        "masks": masks,
    }


def masks_to_tensors(record: dict) -> dict[str, torch.Tensor]:
    """The record's flat indices as boolean masks {layer: (out, in)} (for safetensors)."""
    tensors = {}
    for name, info in record["layers"].items():
        mask = torch.zeros(info["shape"][0] * info["shape"][1], dtype=torch.bool)
        mask[torch.tensor(record["masks"][name], dtype=torch.long)] = True
        tensors[name] = mask.reshape(info["shape"])
    return tensors
