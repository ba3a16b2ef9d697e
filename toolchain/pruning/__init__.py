"""Structural pruning of diffusion UNets (channels and attention heads)."""

from toolchain.pruning.channels import IMPORTANCES, prune_unet_channels, sync_diffusers_attributes

__all__ = ["IMPORTANCES", "prune_unet_channels", "sync_diffusers_attributes"]
