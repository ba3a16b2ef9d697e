"""Channel and attention-head pruning of a diffusers UNet2DConditionModel with torch-pruning.

The UNet is pruned in place with a uniform ratio per layer group (Diff-Pruning style). The
returned record (base config + every tensor's shape + heads per attention) is all that
`toolchain.models.rebuild.rebuild_unet` needs to rebuild the pruned module from safetensors.
torch-pruning is imported inside the functions so that `import toolchain` stays light.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from toolchain.models.rebuild import sync_diffusers_attributes  # re-exported: pruning syncs after each step

logger = logging.getLogger(__name__)


def _magnitude_importance():
    import torch_pruning as tp

    return tp.importance.MagnitudeImportance(p=2)  # L2 norm of the weights of each channel group


def _random_importance():
    import torch_pruning as tp

    return tp.importance.RandomImportance()  # a baseline that magnitude should beat


def _taylor_importance():
    import torch_pruning as tp

    # Diff-Pruning's variant: sum over a channel group of |w * g|, where g is the gradient
    # accumulated over the timesteps by `accumulate_taylor_gradients` (multivariable=False).
    return tp.importance.GroupTaylorImportance(multivariable=False)


# Explicit allow-list of importance criteria: name -> factory. "taylor" needs gradients, which
# `prune_unet_channels` accumulates itself before ranking.
IMPORTANCES: dict[str, Callable[[], Any]] = {
    "magnitude": _magnitude_importance,
    "taylor": _taylor_importance,
    "random": _random_importance,
}


def default_example_inputs(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Smallest inputs that trace every layer: one sample whose side survives every downsample.

    sample (1, in_channels, s, s), timestep (1,), encoder_hidden_states (1, 2, cross_attention_dim).
    """
    config = unet.config
    param = next(unet.parameters())
    side = max(8, 2 ** (len(config.block_out_channels) - 1))
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(1, config.in_channels, side, side, generator=generator).to(param),
        "timestep": torch.tensor([10], device=param.device),
        "encoder_hidden_states": torch.randn(1, 2, config.cross_attention_dim, generator=generator).to(param),
    }


def accumulate_taylor_gradients(
    unet: nn.Module,
    encoder_hidden_states: torch.Tensor,
    noise_scheduler=None,
    latents: torch.Tensor | None = None,
    steps: int = 50,
    stop: float = 0.05,
    batch: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Accumulate the gradients of the denoising loss over timesteps (Diff-Pruning, VainF/Diff-Pruning).

    Timesteps are `steps` evenly spaced values of [0, T) visited from low to high noise, as in
    Diff-Pruning's `ddpm_prune.py` (it walks t = 0..999): the epsilon-prediction loss is largest
    at small t and falls as t grows, so once `loss_t < stop * max(loss_0..t)` the remaining,
    noisier steps are skipped ("Taylor expansion over pruned timesteps"). The step that triggers
    the stop still contributes its gradient, as in the reference. Gradients are summed into
    `param.grad` (no zero_grad between steps); `GroupTaylorImportance` then reads |w * grad|.

    encoder_hidden_states: (B_text, seq, cross_attention_dim), repeated to cover the batch.
    latents: clean latents (B, C, H, W); None draws `batch` standard-normal latents of the
    UNet's sample_size. noise_scheduler: anything with `add_noise` and `config.num_train_timesteps`;
    None means SD's DDPM schedule (scaled_linear, 0.00085..0.012, 1000 steps).
    Returns {"timesteps": used, "losses": per used timestep, "stopped_early": bool, "planned": n}.
    """
    if steps < 1:
        raise ValueError(f"taylor steps={steps}: must be >= 1")
    if not 0.0 <= stop < 1.0:
        raise ValueError(f"taylor stop={stop}: must be in [0, 1) (a share of the largest loss)")
    if noise_scheduler is None:
        from diffusers import DDPMScheduler

        noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    param = next(unet.parameters())
    config = unet.config
    generator = torch.Generator().manual_seed(seed)
    if latents is None:
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        latents = torch.randn(batch, config.in_channels, size, size, generator=generator)
    latents = latents.to(param)
    noise = torch.randn(latents.shape, generator=generator).to(param)  # one noise draw for all t
    repeats = -(-latents.shape[0] // encoder_hidden_states.shape[0])
    context = encoder_hidden_states.to(param).repeat(repeats, 1, 1)[: latents.shape[0]]
    total = noise_scheduler.config.num_train_timesteps
    timesteps = sorted({round(i * (total - 1) / max(steps - 1, 1)) for i in range(steps)})

    requires_grad = {p: p.requires_grad for p in unet.parameters()}
    unet.requires_grad_(True)
    unet.zero_grad(set_to_none=True)
    used, losses, loss_max = [], [], 0.0
    try:
        from tqdm.auto import tqdm

        for t in tqdm(timesteps, desc="taylor", disable=not progress):
            t_batch = torch.full((latents.shape[0],), t, dtype=torch.long, device=param.device)
            noisy = noise_scheduler.add_noise(latents, noise, t_batch)
            loss = torch.nn.functional.mse_loss(unet(noisy, t_batch, context).sample, noise)
            loss.backward()
            value = loss.item()
            used.append(t)
            losses.append(value)
            loss_max = max(loss_max, value)
            if value < stop * loss_max:
                break
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
    stopped = len(used) < len(timesteps)
    logger.info("taylor: %d of %d timesteps used (stop at %.3f of the max loss)", len(used), len(timesteps), stop)
    return {"timesteps": used, "losses": losses, "stopped_early": stopped, "planned": len(timesteps)}


def prune_unet_channels(
    unet: nn.Module,
    ratio: float,
    importance: str = "magnitude",
    example_inputs: dict | None = None,
    round_to: int | None = None,
    global_pruning: bool = False,
    block_ratios: dict[str, float] | None = None,
    taylor: dict | None = None,
) -> dict:
    """Remove `ratio` of the channels of every prunable layer group and of every attention's heads.

    Prunes `unet` in place and returns the JSON-serialisable pruning record.
    block_ratios: module-name prefix ("down_blocks.0", "mid_block", "up_blocks.3") -> its own
    ratio, for the channel groups rooted in that module and its attention heads (torch-pruning's
    `pruning_ratio_dict` / `head_pruning_ratio_dict`). Channels coupled across blocks (the
    residual stream) follow the ratio of the block their group is rooted in.
    taylor: keyword arguments of `accumulate_taylor_gradients` (encoder_hidden_states is
    required) for importance="taylor"; its summary goes into the record. Special cases:
    - `conv_out` is ignored: its output width is the latent channel count. `conv_in`'s input
      and `time_embedding.linear_1`'s input come from the model inputs / the parameter-free
      sinusoidal projection, so the dependency graph never prunes them.
    - to_q/to_k/to_v get their head count so whole heads are removed and head_dim is kept
      (the processors reshape by `heads`; a width not divisible by it breaks forward).
    - the GEGLU projection (`ff.net.0.proj`) is split by `chunk(2)` into value and gate; it is
      declared as two output groups, so both halves lose the same rows and keep `1 - ratio`
      (left alone, torch-pruning keeps only ~15% of it at ratio 0.5).
    - GroupNorm groups are found by torch-pruning itself: channels go in steps of num_groups
      (which is also why `round_to` other than None/1 is refused).
    """
    from diffusers.models.attention_processor import Attention

    block_ratios = _checked_arguments(unet, ratio, importance, round_to, block_ratios, taylor)
    base_config = json.loads(unet.to_json_string())
    params_before = sum(p.numel() for p in unet.parameters())
    pruner = _unet_pruner(unet, ratio, importance, example_inputs, global_pruning, block_ratios)
    taylor_summary = None
    if importance == "taylor":
        taylor_summary = accumulate_taylor_gradients(unet, **taylor)
    pruner.step()
    unet.zero_grad(set_to_none=True)  # the Taylor gradients are spent; pruned shapes differ
    sync_diffusers_attributes(unet)

    params_after = sum(p.numel() for p in unet.parameters())
    logger.info("pruned UNet channels at ratio %.2f: %d -> %d params", ratio, params_before, params_after)
    return {
        "method": "channels",
        "ratio": ratio,
        "importance": importance,
        "global_pruning": global_pruning,
        "round_to": round_to,
        "block_ratios": block_ratios,
        "taylor": taylor_summary,
        "base_config": base_config,
        "shapes": {key: list(tensor.shape) for key, tensor in unet.state_dict().items()},
        "attention_heads": {n: m.heads for n, m in unet.named_modules() if isinstance(m, Attention)},
        "params_before": params_before,
        "params_after": params_after,
    }


def _checked_arguments(unet: nn.Module, ratio, importance, round_to, block_ratios, taylor) -> dict[str, float]:
    """Refuse bad `prune_unet_channels` arguments before anything is touched; returns a copy of
    block_ratios ({} for None)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio={ratio}: must be in [0, 1) (the share of channels removed)")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance={importance!r}: unknown; valid ones are {sorted(IMPORTANCES)}")
    if round_to not in (None, 1):
        # torch-pruning 1.6.1 rounds the per-group count against the whole width, so every
        # grouped layer (GroupNorm-coupled convs, heads, GEGLU: all of a UNet) is left unpruned.
        raise ValueError(
            f"round_to={round_to}: not supported for UNets (torch-pruning 1.6.1 would skip every "
            "GroupNorm-coupled layer); widths already come in multiples of norm_num_groups, pass None"
        )
    block_ratios = dict(block_ratios or {})
    for prefix, block_ratio in block_ratios.items():
        if not 0.0 <= block_ratio < 1.0:
            raise ValueError(f"block_ratios[{prefix!r}]={block_ratio}: must be in [0, 1)")
    modules = dict(unet.named_modules())
    unknown = [prefix for prefix in block_ratios if prefix not in modules or prefix == ""]
    if unknown:
        top = [n for n, _ in unet.named_children()]
        raise ValueError(
            f"block_ratios: {unknown} name no module of this UNet; use module names such as "
            f"'down_blocks.0', 'mid_block', 'up_blocks.1.attentions.0' (top level: {top})"
        )
    if importance == "taylor" and (taylor is None or "encoder_hidden_states" not in taylor):
        raise ValueError(
            "importance='taylor' needs taylor={'encoder_hidden_states': ...} (the text condition "
            "of the calibration batch), plus optional steps, stop, latents, noise_scheduler"
        )
    return block_ratios


def _unet_pruner(unet: nn.Module, ratio, importance, example_inputs, global_pruning, block_ratios):
    """torch-pruning's pruner for `unet` with the special cases of `prune_unet_channels`: conv_out
    ignored, whole heads of to_q/to_k/to_v, GEGLU/SwiGLU projections as two output groups, and
    per-block channel and head ratios."""
    import torch_pruning as tp
    from diffusers.models.activations import GEGLU, SwiGLU
    from diffusers.models.attention_processor import Attention

    modules = dict(unet.named_modules())
    num_heads = {}
    for module in unet.modules():
        if isinstance(module, Attention):
            num_heads.update({layer: module.heads for layer in (module.to_q, module.to_k, module.to_v)})
    split_outputs = {m.proj: 2 for m in unet.modules() if isinstance(m, (GEGLU, SwiGLU))}
    return tp.pruner.BasePruner(
        unet,
        example_inputs if example_inputs is not None else default_example_inputs(unet),
        importance=IMPORTANCES[importance](),
        pruning_ratio=ratio,
        global_pruning=global_pruning,
        ignored_layers=[unet.conv_out],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
        pruning_ratio_dict={modules[prefix]: r for prefix, r in block_ratios.items()},
        head_pruning_ratio_dict={modules[prefix]: r for prefix, r in block_ratios.items()},
        # Fresh dicts: torch-pruning's defaults are shared mutable dicts that it writes into.
        in_channel_groups={},
        out_channel_groups=split_outputs,
        output_transform=lambda output: output.sample,
    )
