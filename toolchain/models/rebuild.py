"""Rebuild a channel-pruned UNet from its base config, its pruning record and its weights.

A pruned UNet no longer matches its config, so `from_pretrained` cannot load it, and pickled
modules are refused. Instead the base architecture is built on the meta device (no weights
allocated), every tensor is shrunk to the recorded shape, and the saved tensors are assigned.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from toolchain.errors import ModelError

logger = logging.getLogger(__name__)


def _check_shapes(record: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse weights that disagree with the record, naming the first offending key."""
    shapes = record["shapes"]
    for key in sorted(set(shapes) | set(state_dict)):
        if key not in state_dict:
            raise ModelError(f"pruned UNet: weight {key} is in the pruning record but not in the weights")
        if key not in shapes:
            raise ModelError(f"pruned UNet: weight {key} is in the weights but not in the pruning record")
        if list(state_dict[key].shape) != list(shapes[key]):
            raise ModelError(
                f"pruned UNet: weight {key} has shape {list(state_dict[key].shape)} but the pruning "
                f"record says {shapes[key]}; the record does not belong to these weights"
            )


def _shrink_to_shapes(unet: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Replace every meta tensor by one of the recorded shape and update the layer attributes."""
    for name, module in unet.named_modules():
        prefix = f"{name}." if name else ""
        for tensors in (module._parameters, module._buffers):
            for local, tensor in tensors.items():
                shape = shapes.get(prefix + local)
                if tensor is None or shape is None or list(tensor.shape) == shape:
                    continue
                empty = torch.empty(shape, dtype=tensor.dtype, device="meta")
                tensors[local] = (
                    nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
                )
        if isinstance(module, nn.Conv2d):
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]
        elif isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)


class OneChannelGroupNorm(nn.GroupNorm):
    """A GroupNorm with one channel per group (pruning leaves such, some configs have them). On a
    1x1 feature map at batch 1 (a UNet's innermost level, run unguided by a k-step generator) each group then holds a
    single value, whose normalised value is 0, so the output is the bias: the kernel, ONNX Runtime
    and Core ML compute that, but `F.group_norm` refuses the input ("Expected more than 1 value
    per channel"). This calls the kernel directly; weights, state dict and exported op are a
    GroupNorm's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, torch.backends.cudnn.enabled)


def allow_batch_one(module: nn.Module) -> nn.Module:
    """Make every GroupNorm of `module` with one channel per group a `OneChannelGroupNorm`, in
    place (same weights and math), so it runs at batch 1; returns `module`."""
    for child in module.modules():
        if type(child) is nn.GroupNorm and child.num_channels == child.num_groups:
            child.__class__ = OneChannelGroupNorm
    return module


def sync_diffusers_attributes(unet: nn.Module, attention_heads: dict[str, int] | None = None) -> None:
    """Make the plain attributes that diffusers' forward reads agree with the (pruned) layers, and
    let GroupNorms left with one channel per group run at batch 1 (`OneChannelGroupNorm`).

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

    allow_batch_one(unet)
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


def rebuild_unet(record: dict, state_dict: dict[str, torch.Tensor]):
    """Build the pruned UNet described by `record` and load `state_dict` into it.

    The result gives bit-identical outputs to the module the record and weights were saved
    from. Raises ModelError when the record and the weights disagree.
    """
    from diffusers import UNet2DConditionModel

    if record.get("method") != "channels":
        raise ModelError(f"pruning record method {record.get('method')!r}: only 'channels' can be rebuilt")
    _check_shapes(record, state_dict)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(record["base_config"])
    _shrink_to_shapes(unet, record["shapes"])
    try:
        sync_diffusers_attributes(unet, record["attention_heads"])
    except (KeyError, ValueError) as exc:
        raise ModelError(f"pruned UNet: attention heads in the pruning record do not fit the weights ({exc})") from None
    unet.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise ModelError(f"pruned UNet: {left_on_meta[0]} was not in the weights (still on the meta device)")
    logger.info("rebuilt pruned UNet with %d params", sum(p.numel() for p in unet.parameters()))
    return unet.eval()
