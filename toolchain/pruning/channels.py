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

logger = logging.getLogger(__name__)


def _magnitude_importance():
    import torch_pruning as tp

    return tp.importance.MagnitudeImportance(p=2)  # L2 norm of the weights of each channel group


def _random_importance():
    import torch_pruning as tp

    return tp.importance.RandomImportance()  # a baseline that magnitude should beat


# Explicit allow-list of importance criteria: name -> factory.
IMPORTANCES: dict[str, Callable[[], Any]] = {"magnitude": _magnitude_importance, "random": _random_importance}


def sync_diffusers_attributes(unet: nn.Module, attention_heads: dict[str, int] | None = None) -> None:
    """Make the plain attributes that diffusers' forward reads agree with the (pruned) layers.

    torch-pruning shrinks weights and Conv/Linear/Norm attributes, but diffusers also keeps
    widths of its own: Downsample2D/Upsample2D assert `x.shape[1] == self.channels`, and the
    attention processors reshape by `attn.heads`. `attention_heads` maps Attention module names
    to head counts; without it the head count is derived from the unchanged head_dim
    (`inner_dim // heads` still holds the pre-pruning values, or the values of a previous sync).
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    for name, module in unet.named_modules():
        if isinstance(module, (Downsample2D, Upsample2D)) and isinstance(getattr(module, "conv", None), nn.Conv2d):
            module.channels = module.conv.in_channels
            module.out_channels = module.conv.out_channels
        elif isinstance(module, ResnetBlock2D):
            module.in_channels = module.conv1.in_channels
            module.out_channels = module.conv2.out_channels
        elif isinstance(module, Attention):
            kv_proj = module.to_k if module.to_k is not None else module.to_q
            if attention_heads is not None:
                heads = attention_heads[name]
            else:
                heads = module.to_q.out_features // (module.inner_dim // module.heads)
            if heads < 1 or module.to_q.out_features % heads or kv_proj.out_features % heads:
                raise ValueError(
                    f"{name}: {heads} heads do not divide to_q width {module.to_q.out_features} "
                    f"and to_k width {kv_proj.out_features}; the pruning record is inconsistent"
                )
            module.heads = module.sliceable_head_dim = heads
            module.inner_dim = module.to_q.out_features
            module.inner_kv_dim = kv_proj.out_features
            module.query_dim = module.to_q.in_features
            module.cross_attention_dim = kv_proj.in_features
            module.out_dim = module.to_out[0].out_features


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


def prune_unet_channels(
    unet: nn.Module,
    ratio: float,
    importance: str = "magnitude",
    example_inputs: dict | None = None,
    round_to: int | None = None,
    global_pruning: bool = False,
) -> dict:
    """Remove `ratio` of the channels of every prunable layer group and of every attention's heads.

    Prunes `unet` in place and returns the JSON-serialisable pruning record. Special cases:
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
    import torch_pruning as tp
    from diffusers.models.activations import GEGLU, SwiGLU
    from diffusers.models.attention_processor import Attention

    base_config = json.loads(unet.to_json_string())
    params_before = sum(p.numel() for p in unet.parameters())
    num_heads = {}
    for module in unet.modules():
        if isinstance(module, Attention):
            num_heads.update({layer: module.heads for layer in (module.to_q, module.to_k, module.to_v)})
    split_outputs = {m.proj: 2 for m in unet.modules() if isinstance(m, (GEGLU, SwiGLU))}

    pruner = tp.pruner.BasePruner(
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
        # Fresh dicts: torch-pruning's defaults are shared mutable dicts that it writes into.
        in_channel_groups={},
        out_channel_groups=split_outputs,
        output_transform=lambda output: output.sample,
    )
    pruner.step()
    sync_diffusers_attributes(unet)

    params_after = sum(p.numel() for p in unet.parameters())
    logger.info("pruned UNet channels at ratio %.2f: %d -> %d params", ratio, params_before, params_after)
    return {
        "method": "channels",
        "ratio": ratio,
        "importance": importance,
        "global_pruning": global_pruning,
        "round_to": round_to,
        "base_config": base_config,
        "shapes": {key: list(tensor.shape) for key, tensor in unet.state_dict().items()},
        "attention_heads": {n: m.heads for n, m in unet.named_modules() if isinstance(m, Attention)},
        "params_before": params_before,
        "params_after": params_after,
    }
