"""Pruning of diffusion UNets: channels and attention heads (Diff-Pruning style), whole blocks
(BK-SDM presets), and concept neurons (ConceptPrune, unstructured erasure)."""

from toolchain.pruning.blocks import PRESETS, remove_unet_blocks, student_config
from toolchain.pruning.channels import (
    IMPORTANCES,
    accumulate_taylor_gradients,
    prune_unet_channels,
    sync_diffusers_attributes,
)
from toolchain.pruning.concept_neurons import concept_prune, masks_to_tensors

__all__ = [
    "IMPORTANCES",
    "PRESETS",
    "accumulate_taylor_gradients",
    "concept_prune",
    "masks_to_tensors",
    "prune_unet_channels",
    "remove_unet_blocks",
    "student_config",
    "sync_diffusers_attributes",
]
