"""Stage `prune`: structural channel pruning of the UNet.

The output is a diffusers folder: the unchanged components are hard-linked from the input, the
UNet is saved as safetensors plus the pruning record that rebuilds it (`models.rebuild`).
"""

from __future__ import annotations

import logging

from toolchain.artifact import Artifact, folder_size
from toolchain.config import PruneConfig
from toolchain.models.io import link_or_copy, link_or_copy_tree, load_unet, save_unet

logger = logging.getLogger(__name__)


def run(source: Artifact, cfg: PruneConfig, ctx) -> Artifact:
    from toolchain.pruning.channels import prune_unet_channels
    from toolchain.stages.benchmark import component_params

    unet = load_unet(source.files / "unet")
    record = prune_unet_channels(unet, ratio=cfg.ratio, importance=cfg.importance)
    logger.info(
        "prune: UNet %d -> %d params (ratio %.2f, %s)",
        record["params_before"], record["params_after"], cfg.ratio, cfg.importance,
    )
    out = ctx.out_dir
    for item in source.files.iterdir():
        if item.name in ("unet", "manifest.json") or item.name.startswith("."):
            continue
        if item.is_dir():
            link_or_copy_tree(item, out / item.name)
        else:
            link_or_copy(item, out / item.name)
    save_unet(unet, out / "unet", record)
    summary = {k: record[k] for k in ("method", "ratio", "importance", "params_before", "params_after")}
    return Artifact(
        path=out,
        kind="diffusers",
        records={"pruning": summary},
        metrics={"params": component_params(out), "size_bytes": folder_size(out)},
    )
